"""Recipes of the distillation and long-context stages: one dataclass tree, validated before any model is built."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashmorph.config import ModelConfig, ParallelConfig, RunConfig, model_shape
from flashmorph.data.config import DataConfig
from flashmorph.data.text_config import TextDataConfig
from flashmorph.errors import ConfigError
from flashmorph.model.config import MorphConfig
from flashmorph.model.layout import read_layout
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.layout import check_layout, check_trainable, layout_from_config
from flashmorph.run_dir import RunDir

TRAINABLE_SETS = ("lora", "linear", "full")


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


@dataclass
class DistillRecipe:
    run: RunConfig = field(default_factory=lambda: RunConfig(run_dir="runs/distill"))
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    morph: MorphConfig = field(default_factory=MorphConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def total_steps(self) -> int:
        schedule = self.distill.length_schedule
        return sum(s.steps for s in schedule) if schedule else self.distill.steps

    @property
    def max_seq_len(self) -> int:
        schedule = self.distill.length_schedule
        return max(s.seq_len for s in schedule) if schedule else self.data.seq_len


def validate_distill_recipe(recipe: DistillRecipe, world_size: int = 1) -> ModelShape:
    """Raise ConfigError on the first problem; returns the model shape. Reads config.json and hybrid.json only."""
    run, model, student, distill, parallel = recipe.run, recipe.model, recipe.student, recipe.distill, recipe.parallel
    run.validate()
    if model.path is None:
        raise ConfigError("model.path is null; distillation needs the original model (for the embedded default: "
                          "<gate search run>/teacher)")
    if not Path(model.path).is_dir():
        raise ConfigError(f"model.path={model.path} does not exist; give a local HF model directory")
    model.validate_dtype()
    if student.layout is None:
        raise ConfigError("student.layout is null; give the hybrid.json written by tools/discretize_gates.py")
    if not Path(student.layout).is_file():
        raise ConfigError(f"student.layout={student.layout} does not exist; write it with tools/discretize_gates.py")
    recipe.morph.validate()
    if recipe.morph.gate_granularity != "layer":
        raise ConfigError("morph.gate_granularity must be 'layer' for distillation: the student is a hybrid of whole layers")
    shape = model_shape(recipe)
    read_layout(student.layout, shape.num_layers)  # one-line error if it does not fit the model
    if student.init_from is not None:
        check_init_from(student.init_from, distill.trainable, shape.num_layers)
    _validate_distill(distill)
    parallel.validate_deepspeed()
    layout = layout_from_config(parallel, world_size)
    for seq_len in ([s.seq_len for s in distill.length_schedule] or [recipe.data.seq_len]):
        check_layout(layout, shape, seq_len)
    check_trainable(layout, distill.trainable)
    for stage_len in [s.seq_len for s in distill.length_schedule] or [recipe.data.seq_len]:
        dataclasses.replace(recipe.data, seq_len=stage_len).validate()
    recipe.text.validate()
    return shape


def _validate_distill(d: DistillConfig) -> None:
    if d.trainable not in TRAINABLE_SETS:
        raise ConfigError(f"distill.trainable={d.trainable!r} is unknown; use one of {TRAINABLE_SETS}")
    if d.trainable == "lora" and (d.lora_rank < 1 or not d.lora_targets):
        raise ConfigError("distill.lora_rank must be >= 1 and distill.lora_targets non-empty, e.g. [q_proj, k_proj, v_proj, o_proj]")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature={d.temperature} must be > 0")
    if d.ce_weight < 0:
        raise ConfigError(f"distill.ce_weight={d.ce_weight} must be >= 0")
    if d.lr <= 0:
        raise ConfigError(f"distill.lr={d.lr} must be > 0")
    for name in ("weight_decay", "grad_clip"):  # torch/DeepSpeed would refuse them after the run dir exists
        if getattr(d, name) < 0:
            raise ConfigError(f"distill.{name}={getattr(d, name)} must be >= 0 (0 turns it off)")
    for name in ("micro_batch_size", "grad_accum_steps", "log_every", "token_chunk", "vocab_chunk", "max_bad_steps"):
        if getattr(d, name) < 1:
            raise ConfigError(f"distill.{name}={getattr(d, name)} must be >= 1")
    for name in ("save_every", "keep_last", "warmup_steps"):
        if getattr(d, name) < 0:
            raise ConfigError(f"distill.{name}={getattr(d, name)} must be >= 0")
    if not d.length_schedule and d.steps < 1:
        raise ConfigError(f"distill.steps={d.steps} must be >= 1")
    previous = 0
    for idx, stage in enumerate(d.length_schedule):
        if stage.seq_len <= previous or stage.steps < 1:
            raise ConfigError(f"distill.length_schedule[{idx}]: lengths must increase and steps be >= 1 "
                              f"(got seq_len={stage.seq_len}, steps={stage.steps})")
        previous = stage.seq_len



def check_init_from(run_dir: str, trainable: str, num_layers: int) -> None:
    """student.init_from must be a finished distill (or long-context) run of this model: its summary.json, and the
    adapter/ (LoRA) or student/ (linear, full) it wrote, which is what the next stage loads."""
    from flashmorph.model.hf_dir import validate_model_dir

    where = f"student.init_from={run_dir}"
    fix = "give the run.run_dir of a finished distill run"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{where} does not exist; {fix}")
    if not RunDir(run_dir).summary.is_file():
        raise ConfigError(f"{where} holds no summary.json, so it is not a finished distill run; {fix}")
    if trainable == "lora":
        if not (RunDir(run_dir).adapter / "adapter_model.safetensors").is_file():
            raise ConfigError(f"{where} holds no adapter/adapter_model.safetensors (a LoRA run writes it); {fix} "
                              "with distill.trainable=lora")
        return
    student = validate_model_dir(RunDir(run_dir).student, f"{where} (its student/)")
    if student.num_layers != num_layers:
        raise ConfigError(f"{where}: its student has {student.num_layers} layers but model.path has {num_layers}; "
                          "continue from a run of the same model")
