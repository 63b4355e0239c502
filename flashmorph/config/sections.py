"""The sections of a recipe, one dataclass each, with a default and a one-line comment per field."""

from dataclasses import dataclass, field

from flashmorph.errors import ConfigError, check_choice
from flashmorph.model.config import DTYPES

REGULARIZERS = ("mean", "budget")  # search.regularizer
TEACHER_DEVICES = ("auto", "cpu", "cuda")  # teacher.device
MIN_TEXT_VOCAB = 6 + 6 * 256  # synthetic token space: ~1/6 of the non-special ids are filler, text needs 256 of them
TRAINABLE_SETS = ("lora", "linear", "full")  # distill.trainable


@dataclass
class ModelConfig:
    path: str | None = None  # HF model directory; null = build and train the embedded tiny teacher
    dtype: str = "bfloat16"  # weights/activations dtype: float32, bfloat16 or float16
    activation_checkpointing: bool = False  # recompute decoder layers in backward (needed at long context)

    def validate_dtype(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class TeacherConfig:
    family: str = "llama"  # transformers model type of the embedded teacher (llama, qwen2, qwen3, mistral)
    num_layers: int = 4  # decoder layers
    hidden_size: int = 128  # model width (at 64 the 4-layer model rarely leaves the shortcut; see teacher.py)
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA when < num_heads)
    vocab_size: int = 64  # synthetic token space size
    curriculum: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])  # mqar pairs per curriculum stage
    advance_accuracy: float = 0.9  # a stage ends once the running train recall reaches this ...
    max_steps_per_stage: int = 1000  # ... or after this many optimizer steps
    batch_size: int = 64  # samples per step
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up steps
    eval_samples: int = 512  # held-out samples for the reported accuracy
    seed: int = 0  # init and data seed
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu" or "cuda"; bf16 autocast on cuda
    text_batch_size: int = 0  # stdlib-source text windows per step beside the retrieval batch (0 = retrieval only)
    text_seq_len: int = 128  # tokens per text window (one UTF-8 byte = one token; needs vocab_size >= 1542)
    text_steps: int = 0  # text-only steps before the curriculum, so copy/induction heads form first
    intermediate_size: int | None = None  # MLP width (null = 4 x hidden_size)
    log_every: int = 100  # steps between progress log lines (also with --no-progress)
    checkpoint_every: int = 500  # steps between resumable checkpoints in <teacher dir>/checkpoints (0 = none)
    require_complete: bool = True  # refuse (exit 3) to hand gate search a teacher whose curriculum never finished


@dataclass
class SearchConfig:
    steps: int = 300  # optimizer steps of gate search
    lr: float = 0.05  # AdamW learning rate of the gate logits
    weight_decay: float = 0.0  # AdamW weight decay of the gate logits
    micro_batch_size: int = 8  # samples per rank per micro step
    grad_accum_steps: int = 1  # micro steps per optimizer step
    budget: int | float = 0.5  # full-attention layers to keep: a count (int) or a fraction of layers (float)
    regularizer: str = "mean"  # "mean": lambda * mean gate; "budget": lambda * relu(mean gate - budget fraction)
    reg_weight: float = 0.5  # lambda, the regularizer's weight at full strength
    reg_warmup_steps: int = 0  # lambda ramps linearly from 0 over these steps (0 = constant)
    grad_clip: float = 0.0  # gradient clipping norm (0 = off)
    log_every: int = 1  # steps between tensorboard/console logs
    save_every: int = 100  # steps between checkpoints (0 = only the final one)
    keep_last: int = 2  # complete checkpoints kept on disk (0 = keep all)
    max_bad_steps: int = 10  # stop (exit 4) after this many steps in a row skipped for NaN/Inf loss, gates or grads


@dataclass
class LayoutConfig:
    tensor_parallel: int = 1  # megatron-core TP degree at this GPU count
    sequence_parallel: int = 1  # Ulysses degree at this GPU count


@dataclass
class ParallelConfig:
    zero_stage: int = 3  # DeepSpeed ZeRO stage (3 partitions the frozen weights over data-parallel ranks)
    deepspeed_config: str | None = None  # a DeepSpeed JSON whose keys override the generated config
    sequence_parallel: int = 1  # Ulysses degree (must divide heads and seq_len)
    tensor_parallel: int = 1  # megatron-core TP degree (must divide heads)
    layouts: dict[int, LayoutConfig] = field(default_factory=dict)  # GPU count -> degrees; wins over the two above

    def validate_deepspeed(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.deepspeed_config is not None:
            from flashmorph.parallel.deepspeed_json import check_deepspeed_values, read_deepspeed_json

            check_deepspeed_values(read_deepspeed_json(self.deepspeed_config))


@dataclass
class RunConfig:
    run_dir: str = "runs/gate_search"  # every output of the run goes here
    seed: int = 0  # global seed (gate init is deterministic; data has its own seed)

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run.run_dir is empty; set it to the directory for this run's outputs")


@dataclass
class StudentConfig:
    layout: str | None = None  # hybrid.json from tools/discretize_gates.py: which layers stay softmax (required)
    init_from: str | None = None  # a finished distill run dir to continue from (its adapter or weights); null = the original model


@dataclass
class LengthStage:
    seq_len: int = 4096  # tokens per sample in this stage
    steps: int = 100  # optimizer steps spent at this length


@dataclass
class DistillConfig:
    trainable: str = "lora"  # "lora" (peft adapters; teacher = same weights, adapters off), "linear" (q/k/v/o of linear layers) or "full"
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: float = 32.0  # LoRA scaling alpha (update scaled by alpha / r)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # module names given adapters
    lora_linear_layers_only: bool = True  # adapters only in linear layers; full layers keep the teacher's attention exactly
    temperature: float = 1.0  # softmax temperature of the KL (scaled by temperature^2)
    ce_weight: float = 0.0  # weight of next-token cross-entropy added to the KL (0 = pure distillation)
    steps: int = 1000  # optimizer steps (ignored when length_schedule is set: its steps add up instead)
    lr: float = 1e-4  # AdamW peak learning rate
    warmup_steps: int = 50  # linear learning-rate warm-up, then constant
    weight_decay: float = 0.0  # AdamW weight decay
    micro_batch_size: int = 1  # samples per data-parallel rank per micro step
    grad_accum_steps: int = 1  # micro steps per optimizer step
    grad_clip: float = 1.0  # gradient clipping norm (0 = off)
    token_chunk: int = 1024  # tokens per chunk of the tiled KL: logits exist for this many tokens at a time
    vocab_chunk: int = 16384  # vocabulary slice of the fp32 softmax math inside a chunk
    length_schedule: list[LengthStage] = field(default_factory=list)  # long-context curriculum; empty = data.seq_len throughout
    log_every: int = 1  # steps between tensorboard/console logs
    save_every: int = 100  # steps between checkpoints (0 = only the final one)
    keep_last: int = 2  # complete checkpoints kept on disk (0 = keep all)
    max_bad_steps: int = 10  # stop (exit 4) after this many steps in a row skipped for NaN/Inf loss or gradients
