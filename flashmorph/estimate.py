"""Per-GPU memory (weights, gradients, optimizer, activations, logits, ZeRO buffers) and tokens per step of a
flashmorph stage, from a model shape and a parallel layout: pure arithmetic, no torch, so it runs before launch.
Formulas live in the docstrings below and in docs/estimate.md; guessed terms are named constants."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from flashmorph.errors import ConfigError, check_choice
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.layout import DegreeNames, check_layout, resolve_layout

GIB = 1024**3
FP32 = 4  # bytes of every fp32 tensor (optimizer state, master weights, upcast norms/softmax)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
TRAINABLE_SETS = ("gates", "lora", "linear", "full")
ZERO_STAGES = (0, 1, 2, 3)
ESTIMATE_NAMES = DegreeNames(tensor="tensor_parallel", sequence="sequence_parallel", world="gpus")

# DeepSpeed defaults (deepspeed/runtime/zero/config.py, 0.19): read from its source, not guessed.
DS_PREFETCH_BUCKET_ELEMS = 5e7  # stage3_prefetch_bucket_size (flashmorph.parallel.zero sets the same value)
DS_REDUCE_BUCKET_ELEMS = 5e8  # reduce_bucket_size: stage 3 allocates this IPG buffer whole, in the model dtype
DS_SUB_GROUP_ELEMS = 1e9  # sub_group_size: stage 3 keeps one fp32 gradient buffer of min(partition, this)

FLA_GLA_CHUNK = 64  # fla chunk_gla's chunk size BT (fla/ops/gla/chunk.py): sizes its A matrix and chunk states

# Guesses (not derived from code): calibrate against measured peaks and update docs/estimate.md.
FRAGMENTATION = 0.05  # caching-allocator slack, as a fraction of the dynamic (activation + loss) memory
RUNTIME_RESERVED_GIB = 1.0  # CUDA context, cuBLAS/NCCL workspaces: outside torch's allocator, inside the GPU's
GATE_SEARCH_ANSWER_TOKENS = 1024  # answer tokens per micro batch whose logits gate search computes
DEFAULT_FULL_LAYER_FRACTION = 0.25  # full-attention layers of a hybrid when neither flag nor recipe says
MAX_SEQ_LEN_SEARCH = 1 << 24  # --max-seq-len searches up to 16M tokens
SEQ_LEN_STEP = 1024  # --max-seq-len answers in multiples of this (and of sequence_parallel)

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output dim split over TP
ROW_PARALLEL = ("o_proj", "down_proj")  # input dim split over TP
PROJECTIONS = COLUMN_PARALLEL + ROW_PARALLEL
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------------------- model shapes


# Published config.json values of each model (hub: meta-llama/Meta-Llama-3-{8B,70B}, Qwen/Qwen3-{4B,8B,32B}).
PRESETS = {
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256, model_type="llama"),
    "llama3-70b": ModelShape("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256, model_type="llama"),
    "qwen3-4b": ModelShape("qwen3-4b", 36, 2560, 32, 8, 128, 9728, 151936, tie_embeddings=True, qk_norm=True,
                           model_type="qwen3"),
    "qwen3-8b": ModelShape("qwen3-8b", 36, 4096, 32, 8, 128, 12288, 151936, qk_norm=True, model_type="qwen3"),
    "qwen3-32b": ModelShape("qwen3-32b", 64, 5120, 64, 8, 128, 25600, 151936, qk_norm=True, model_type="qwen3"),
}


def _letters_and_digits(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def preset_named_by(model_name: str) -> str | None:
    """The one preset a model directory's name spells, ignoring case and punctuation ("Meta-Llama-3-70B-Instruct"
    -> "llama3-70b", "Qwen3-8B" -> "qwen3-8b"); None when no preset or more than one matches."""
    name = _letters_and_digits(model_name)
    found = [preset for preset in PRESETS if _letters_and_digits(preset) in name]
    return found[0] if len(found) == 1 else None


def shape_from_hf_config(config: dict, name: str = "model") -> ModelShape:
    """A ModelShape from a config.json dict of any Llama-like decoder (the family is not checked)."""
    return ModelShape.from_hf_config(config, name, morphable=False)


def load_shape(preset: str | None = None, model_dir: str | None = None) -> ModelShape:
    """The shape of a named preset or of a HF model directory's config.json (exactly one of them)."""
    if (preset is None) == (model_dir is None):
        raise ConfigError("give exactly one of --preset NAME or --model-dir DIR")
    if preset is not None:
        check_choice("--preset", preset, PRESETS)
        return PRESETS[preset]
    shape = ModelShape.from_model_dir(model_dir, f"--model-dir {model_dir}", morphable=False)
    return dataclasses.replace(shape, name=str(model_dir))


# ----------------------------------------------------------------------------------------- the run


@dataclass
class EstimateSetup:
    """A run's layout and stage, as far as memory depends on it."""

    gpus: int = 1  # total GPUs; data parallel = gpus / (tensor_parallel * sequence_parallel)
    tensor_parallel: int = 1  # megatron-core TP degree (shards layer weights, heads and MLP width)
    sequence_parallel: int = 1  # Ulysses degree (shards the sequence; attention sees all tokens, heads / SP)
    seq_len: int = 8192  # tokens per sequence
    micro_batch: int = 1  # sequences per data-parallel rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    dtype: str = "bfloat16"  # weights and activations
    trainable: str = "gates"  # gates (gate search) | lora | linear (q/k/v/o of linear layers) | full
    lora_rank: int = 16  # LoRA rank r (trainable=lora)
    lora_modules: tuple[str, ...] = ATTENTION_PROJECTIONS  # projections that get adapters (trainable=lora)
    lora_linear_layers_only: bool = True  # adapters only in linear/mixed layers (distill.lora_linear_layers_only)
    full_layers: int | str | None = None  # full-attention layers of the hybrid, "mixed" (every layer runs both
    #                                       branches, gate search), or None: mixed for gates, else a quarter
    activation_checkpointing: bool = True  # recompute each decoder layer in backward
    zero_stage: int = 3  # DeepSpeed ZeRO stage; the sharding group is DP x SP
    loss_chunk: int | None = 4096  # tokens per tiled-loss chunk (None or 0: all loss tokens at once)
    vocab_chunk: int | None = None  # vocab columns per fp32 loss tile (None: the whole vocabulary)
    loss_tokens: int | None = None  # tokens with logits per micro step (None: gates -> answer tokens, else all)

    @property
    def data_parallel(self) -> int:
        return self.gpus // (self.tensor_parallel * self.sequence_parallel)

    @property
    def shard_group(self) -> int:
        """Ranks ZeRO shards over: DP x SP (TP ranks hold different slices, so they are not in the group)."""
        return self.gpus // self.tensor_parallel

    @property
    def local_tokens(self) -> int:
        """Tokens each rank holds in the sequence-sharded parts of the model: micro_batch * seq_len / SP."""
        return self.micro_batch * self.seq_len // self.sequence_parallel

    @property
    def has_teacher(self) -> bool:
        """Distillation (every trainable set but gates) runs the original model as teacher."""
        return self.trainable != "gates"

    def resolved_full_layers(self, shape: ModelShape) -> int | str:
        if self.full_layers is not None:
            return self.full_layers
        if self.trainable == "gates":
            return "mixed"
        return max(1, round(DEFAULT_FULL_LAYER_FRACTION * shape.num_layers))


def validate(shape: ModelShape, setup: EstimateSetup) -> None:
    """Reject layouts the real run would reject, each with one line naming the field and the fix."""
    for name in ("gpus", "tensor_parallel", "sequence_parallel", "seq_len", "micro_batch", "grad_accum"):
        value = getattr(setup, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    layout = resolve_layout(setup.tensor_parallel, setup.sequence_parallel, setup.gpus, ESTIMATE_NAMES)
    check_layout(layout, shape, setup.seq_len, ESTIMATE_NAMES)
    check_choice("dtype", setup.dtype, DTYPE_BYTES)
    check_choice("trainable", setup.trainable, TRAINABLE_SETS)
    if setup.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"zero_stage={setup.zero_stage!r} must be one of 0, 1, 2, 3")
    if setup.trainable == "lora":
        if not isinstance(setup.lora_rank, int) or setup.lora_rank < 1:
            raise ConfigError(f"lora_rank={setup.lora_rank!r} must be a positive integer")
        unknown = [m for m in setup.lora_modules if m not in PROJECTIONS]
        if unknown or not setup.lora_modules:
            raise ConfigError(f"lora_modules has {unknown[0] if unknown else 'nothing'!r}; use names from "
                              f"{', '.join(PROJECTIONS)}")
    full = setup.resolved_full_layers(shape)
    if full != "mixed" and (not isinstance(full, int) or isinstance(full, bool) or not 0 <= full <= shape.num_layers):
        raise ConfigError(f"full_layers={full!r} must be 'mixed' or an integer in 0..{shape.num_layers}")
    if full == "mixed" and setup.trainable == "linear":
        raise ConfigError("trainable=linear trains the linear layers of a hybrid; give full_layers as a count, "
                          "not 'mixed'")
    for name in ("loss_chunk", "vocab_chunk", "loss_tokens"):
        value = getattr(setup, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name}={value!r} must be a non-negative integer or unset")


# ----------------------------------------------------------------------------------------- parameters


def _layer_params_local(shape: ModelShape, tp: int) -> dict[str, float]:
    """Parameters of one decoder layer on one TP rank: projections (and q/k/v biases) split over TP; the two
    RMSNorms and Qwen3's q/k norms replicated."""
    dims = shape.projection_dims()
    params = {name: fan_in * fan_out / tp for name, (fan_in, fan_out) in dims.items()}
    if shape.qkv_bias:
        params["qkv_bias"] = (dims["q_proj"][1] + 2 * dims["k_proj"][1]) / tp
    params["norms"] = 2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_norm else 0)
    return params


def _lora_params_local(shape: ModelShape, setup: EstimateSetup) -> float:
    """LoRA parameters of one layer on one TP rank: A [r, in], B [out, r]; a column-parallel base splits B's
    rows over TP, a row-parallel base splits A's columns (peft's megatron LoRA layout)."""
    r, tp = setup.lora_rank, setup.tensor_parallel
    dims = shape.projection_dims()
    total = 0.0
    for name in setup.lora_modules:
        fan_in, fan_out = dims[name]
        total += r * fan_in + r * fan_out / tp if name in COLUMN_PARALLEL else r * fan_in / tp + r * fan_out
    return total


def _lora_layers(shape: ModelShape, setup: EstimateSetup) -> int:
    """Layers that carry adapters: all, or (lora_linear_layers_only) those with a linear branch."""
    full = setup.resolved_full_layers(shape)
    if setup.lora_linear_layers_only and full != "mixed":
        return shape.num_layers - full
    return shape.num_layers


@dataclass
class ParamCounts:
    """Parameter counts per TP rank, before ZeRO sharding."""

    layer: float  # one decoder layer
    embedding: float  # input embedding (replicated over TP)
    lm_head: float  # output projection (0 when tied)
    final_norm: float
    total: float  # the frozen base model (or the full model being trained)
    trainable: float  # what the optimizer holds
    adapters: float  # parameters the base model lacks (gates, LoRA), held as weights too
    largest_trainable_unit: float  # largest module whose full gradient exists before ZeRO's reduce-scatter


def count_params(shape: ModelShape, setup: EstimateSetup) -> ParamCounts:
    """Per-TP-rank parameter counts for `setup.trainable`.

    gates: L per-layer gate scalars. lora: `_lora_params_local` x adapter layers (`_lora_layers`).
    linear: q/k/v/o (and biases) of the L - full_layers linear layers. full: every parameter.
    """
    tp, layers = setup.tensor_parallel, shape.num_layers
    per_layer = _layer_params_local(shape, tp)
    layer = sum(per_layer.values())
    embedding = shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tie_embeddings else embedding
    total = layers * layer + embedding + lm_head + shape.hidden_size
    attention = sum(per_layer[name] for name in ATTENTION_PROJECTIONS) + per_layer.get("qkv_bias", 0.0)
    adapters, largest = 0.0, 0.0
    if setup.trainable == "gates":
        trainable = adapters = largest = float(layers)
    elif setup.trainable == "lora":
        largest = _lora_params_local(shape, setup)
        trainable = adapters = _lora_layers(shape, setup) * largest
    elif setup.trainable == "linear":
        full = setup.resolved_full_layers(shape)
        trainable, largest = (layers - full) * attention, attention
    else:
        trainable, largest = total, max(layer, embedding)
    return ParamCounts(layer, embedding, lm_head, shape.hidden_size, total, trainable, adapters, largest)


# ----------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ActivationCoefficients:
    """Calibration knobs, one per group of activation terms (1.0 = the tensor count read from the code paths).

    Every activation byte of the estimate is a term `group/name` times the coefficient of its group, so fitting
    a measured peak means changing numbers here, not formulas.
    """

    checkpoint: float = 1.0  # layer inputs kept by activation checkpointing
    norm: float = 1.0  # RMSNorm's saved fp32 inputs (and outputs when norms train)
    projection_inputs: float = 1.0  # inputs that trainable projections (or their LoRA A) save for weight grads
    softmax: float = 1.0  # SDPA's saved q/k/v/out/lse
    kv_repeat: float = 0.0  # 1.0 when SDPA runs on repeat_kv'ed K/V (masked attention); 0 with native GQA
    linear: float = 1.0  # Liger GLA: fp32 feature maps, decay input, chunk_gla's saved inputs and A
    mlp: float = 1.0  # SwiGLU's saved gate/up/act
    backward: float = 1.0  # gradients alive during one layer's backward
    gla_state: float = 1.0  # fla's chunk states h and dh (fp32) during the GLA backward
    globals: float = 1.0  # final norm, RoPE cos/sin
    loss: float = 1.0  # logits and their fp32 tiles


# Fitted to one H200 measurement (bench/distill_step.py, 8B shape, LoRA distill step, 1/4 full layers, ZeRO-3 on
# one GPU, docs/benchmarks.md): the formulas above overestimated the dynamic memory by the same factor, 1/0.773,
# at 8K, 16K and 32K, so every activation group is scaled by it. UNCALIBRATED keeps the raw tensor counts.
UNCALIBRATED = ActivationCoefficients()
MEASURED_SCALE = 0.773
DEFAULT_COEFFICIENTS = ActivationCoefficients(**{
    name: value * MEASURED_SCALE for name, value in dataclasses.asdict(UNCALIBRATED).items()})


@dataclass(frozen=True)
class _LocalDims:
    """Widths per local token on one rank. Ulysses trades sequence for heads, so per local token a rank holds
    H/TP query heads in attention as outside it; KV heads fewer than SP are replicated (hkv = SP x kept)."""

    h: int  # hidden (replicated over TP: no megatron sequence parallelism)
    hq: int  # query heads per TP rank
    hkv: float  # KV heads per local token inside attention
    hkv_proj: int  # KV heads per TP rank before the all-to-all
    d: int
    il: int  # MLP width per TP rank
    p: int  # activation dtype bytes


def _local_dims(shape: ModelShape, setup: EstimateSetup) -> _LocalDims:
    tp, sp = setup.tensor_parallel, setup.sequence_parallel
    kv_tp = shape.num_kv_heads // tp
    hkv = sp * max(1, kv_tp // sp)
    return _LocalDims(shape.hidden_size, shape.num_heads // tp, hkv, kv_tp, shape.head_dim,
                      shape.intermediate_size // tp, DTYPE_BYTES[setup.dtype])


def _trained_projections(setup: EstimateSetup, mode: str) -> set[str]:
    """Projections of a layer in `mode` whose weights (or LoRA A) need their inputs saved."""
    if setup.trainable == "full":
        return set(PROJECTIONS)
    if setup.trainable == "lora" and (mode != "full" or not setup.lora_linear_layers_only):
        return set(setup.lora_modules)
    if setup.trainable == "linear" and mode == "linear":
        return set(ATTENTION_PROJECTIONS)
    return set()


def layer_saved_terms(shape: ModelShape, setup: EstimateSetup, mode: str) -> dict[str, float]:
    """Bytes per local token that autograd saves for one decoder layer in `mode` (full | linear | mixed).

    With p = dtype bytes, F = 4, widths per rank (h, hq, hkv, d, il as in `_LocalDims`), C = fla's chunk:
      norm/rmsnorm_fp32           2 h F              (each RMSNorm saves its fp32-upcast input)
      norm/rmsnorm_out            2 h p              (only when norm weights train)
      norm/qk_norm_fp32           (hq + hkv_proj) d F  (Qwen3)
      projection_inputs/*         h p (q/k/v in), hq d p (o in), h p (gate/up in), il p (down in): trained ones
      mlp/gate_up_act             3 il p             (SwiGLU: gate and up outputs, silu(gate))
      softmax/qkv                 (hq + 2 hkv) d p   (post-RoPE q, k, v kept by SDPA)
      softmax/out + lse           hq d p + hq F
      softmax/out_for_gate        hq d p             (mixed: the transposed copy the gate product keeps)
      kv_repeat/kv                2 (hq - hkv) d p   (repeat_kv'ed K/V, coefficient 0 by default)
      linear/feature_maps_fp32    2 hq d F           (softmax feature maps of q and repeated k)
      linear/decay_input_fp32     hq d F             (logsigmoid input)
      linear/kernel_inputs        3 hq d p + hq d F  (chunk_gla keeps q, k, v and the fp32 g_cumsum)
      linear/intra_chunk_A        hq C F
      linear/out                  hq d p
    """
    x = _local_dims(shape, setup)
    trained = _trained_projections(setup, mode)
    terms = {"norm/rmsnorm_fp32": 2 * x.h * FP32}
    if setup.trainable == "full":
        terms["norm/rmsnorm_out"] = 2 * x.h * x.p
    if shape.qk_norm:
        terms["norm/qk_norm_fp32"] = (x.hq + x.hkv_proj) * x.d * FP32
    if trained & {"q_proj", "k_proj", "v_proj"}:
        terms["projection_inputs/attention_in"] = x.h * x.p
    if "o_proj" in trained:
        terms["projection_inputs/o_in"] = x.hq * x.d * x.p
    if trained & {"gate_proj", "up_proj"}:
        terms["projection_inputs/mlp_in"] = x.h * x.p
    if "down_proj" in trained:
        terms["projection_inputs/down_in"] = x.il * x.p
    terms["mlp/gate_up_act"] = 3 * x.il * x.p
    if mode in ("full", "mixed"):
        terms["softmax/qkv"] = (x.hq + 2 * x.hkv) * x.d * x.p
        terms["softmax/out"] = x.hq * x.d * x.p
        terms["softmax/lse"] = x.hq * FP32
        terms["kv_repeat/kv"] = 2 * (x.hq - x.hkv) * x.d * x.p
    if mode == "mixed":
        terms["softmax/out_for_gate"] = x.hq * x.d * x.p
    if mode in ("linear", "mixed"):
        terms["linear/feature_maps_fp32"] = 2 * x.hq * x.d * FP32
        terms["linear/decay_input_fp32"] = x.hq * x.d * FP32
        terms["linear/kernel_inputs"] = 3 * x.hq * x.d * x.p + x.hq * x.d * FP32
        terms["linear/intra_chunk_A"] = x.hq * FLA_GLA_CHUNK * FP32
        terms["linear/out"] = x.hq * x.d * x.p
    return terms


def layer_backward_terms(shape: ModelShape, setup: EstimateSetup, mode: str) -> dict[str, float]:
    """Bytes per local token of gradients alive at once during one layer's backward (beyond its saved set).

      backward/hidden_grads       2 h p + h F        (residual-stream grad, norm input grad, fp32 norm temp)
      backward/mlp                3 il p             (grads of gate, up, act)  -- the MLP phase
      backward/softmax_dqkv       (hq + 2 hkv) d p + hq d F  (dq, dk, dv; fp32 dq accumulator)
      backward/gla_grads          4 hq d F + hq C F + hq d (p + F)  (fp32 dq, dk and their second copies,
                                                     dA, dv, dg: fla's chunk_gla_bwd)
      gla_state/h_dh              2 hq d^2 F / C     (chunk states h and dh, recomputed in fp32)
      backward/ulysses            2 (hq + hkv) d p   (all-to-all buffers of q/k/v/out grads; SP > 1)
    The MLP and attention backward run one after the other, so `backward_working_set` takes
    hidden_grads + max(MLP phase, attention phase); the terms are returned unsummed for reporting.
    """
    x = _local_dims(shape, setup)
    terms = {"backward/hidden_grads": 2 * x.h * x.p + x.h * FP32, "backward/mlp": 3 * x.il * x.p}
    if mode in ("full", "mixed"):
        terms["backward/softmax_dqkv"] = (x.hq + 2 * x.hkv) * x.d * x.p + x.hq * x.d * FP32
    if mode in ("linear", "mixed"):
        terms["backward/gla_grads"] = 4 * x.hq * x.d * FP32 + x.hq * FLA_GLA_CHUNK * FP32 + x.hq * x.d * (x.p + FP32)
        terms["gla_state/h_dh"] = 2 * x.hq * x.d * x.d * FP32 / FLA_GLA_CHUNK
    if setup.sequence_parallel > 1:
        terms["backward/ulysses"] = 2 * (x.hq + x.hkv) * x.d * x.p
    return terms


def _weighted(terms: dict[str, float], coeffs: ActivationCoefficients) -> dict[str, float]:
    return {name: value * getattr(coeffs, name.split("/")[0]) for name, value in terms.items()}


def backward_working_set(terms: dict[str, float]) -> float:
    """hidden_grads + max(MLP phase, attention phase) of already-weighted backward terms (bytes per token)."""
    attention = sum(v for k, v in terms.items() if k not in ("backward/hidden_grads", "backward/mlp"))
    return terms["backward/hidden_grads"] + max(terms["backward/mlp"], attention)


def layer_modes(shape: ModelShape, setup: EstimateSetup) -> dict[str, int]:
    """How many layers run each mode: {"mixed": L} or {"full": n, "linear": L - n} (zero counts dropped)."""
    full = setup.resolved_full_layers(shape)
    if full == "mixed":
        return {"mixed": shape.num_layers}
    return {mode: n for mode, n in (("full", full), ("linear", shape.num_layers - full)) if n}


def loss_terms(shape: ModelShape, setup: EstimateSetup) -> dict[str, float]:
    """Bytes of the tiled loss at its peak (one chunk alive at a time).

    n = loss tokens per micro step (gates: answer tokens, default GATE_SEARCH_ANSWER_TOKENS; else all local
    tokens), c = min(n, loss_chunk), Vc = min(V, vocab_chunk); lm_head is replicated over TP, so V is whole:
      loss/student_logits   2 c V p   (logits and their gradient)
      loss/student_fp32     2 c Vc F  (fp32 log-softmax and its gradient)
      loss/teacher_logits   c V p + c Vc F  (distillation: the teacher's chunk and its fp32 log-probs)
      loss/teacher_hidden   t h p     (distillation: teacher final hidden states, kept for the chunks)
    """
    p, vocab, tokens = DTYPE_BYTES[setup.dtype], shape.vocab_size, setup.local_tokens
    if setup.loss_tokens is not None:
        n = min(tokens, setup.loss_tokens)
    else:
        n = min(tokens, GATE_SEARCH_ANSWER_TOKENS) if setup.trainable == "gates" else tokens
    c = min(n, setup.loss_chunk) if setup.loss_chunk else n
    vc = min(vocab, setup.vocab_chunk) if setup.vocab_chunk else vocab
    terms = {"loss/student_logits": 2 * c * vocab * p, "loss/student_fp32": 2 * c * vc * FP32}
    if setup.has_teacher:
        terms["loss/teacher_logits"] = c * vocab * p + c * vc * FP32
        terms["loss/teacher_hidden"] = tokens * shape.hidden_size * p
    return terms


# ----------------------------------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Bytes per GPU by component, and what the step processes. `total` is the predicted peak:

        total = weights + teacher_weights + gradients + optimizer + zero_buffers
                + activations + max(layer_backward, logits_loss) + overhead

    (the loss runs before the layers' backward and frees its buffers, so those two never coexist).
    `allocated` = total - overhead is what torch.cuda.max_memory_allocated should read.
    """

    weights: float
    teacher_weights: float
    gradients: float
    optimizer: float
    zero_buffers: float
    activations: float  # kept across the step: checkpoints (+ every layer's saved set without checkpointing)
    layer_backward: float  # one recomputed layer's saved set (checkpointing) + its backward working set
    logits_loss: float
    overhead: float  # guesses: FRAGMENTATION and RUNTIME_RESERVED_GIB
    tokens_per_step: int
    sequences_per_step: int
    params_total: float  # per TP rank, before ZeRO
    params_trainable: float
    full_layers: int | str
    terms: dict = field(default_factory=dict)  # per-token activation terms by layer mode, loss terms: for calibration

    COMPONENTS = ("weights", "teacher_weights", "gradients", "optimizer", "zero_buffers", "activations",
                  "layer_backward", "logits_loss", "overhead")

    @property
    def total(self) -> float:
        persistent = self.weights + self.teacher_weights + self.gradients + self.optimizer + self.zero_buffers
        return persistent + self.activations + max(self.layer_backward, self.logits_loss) + self.overhead

    @property
    def allocated(self) -> float:
        return self.total - self.overhead

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total <= gpu_memory_gib * GIB

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) / GIB for name in self.COMPONENTS}
        out.update(total=self.total / GIB, allocated=self.allocated / GIB)
        out = {f"{name}_gib": round(value, 4) for name, value in out.items()}
        out.update(tokens_per_step=self.tokens_per_step, sequences_per_step=self.sequences_per_step,
                   params_total_per_tp_rank=int(self.params_total),
                   params_trainable_per_tp_rank=int(self.params_trainable), full_layers=self.full_layers,
                   terms_bytes=self.terms)
        return out


def estimate(shape: ModelShape, setup: EstimateSetup,
             coeffs: ActivationCoefficients = DEFAULT_COEFFICIENTS) -> MemoryEstimate:
    """Per-GPU memory of `setup` on `shape`. With P = per-TP-rank parameters, T = trainable ones,
    S = DP x SP (ZeRO's group), p = dtype bytes:

      weights       (P + adapters) p / S under ZeRO-3, else (P + adapters) p
      teacher       P p / S            (linear/full only: a separate frozen ZeRO-3 model; LoRA shares weights)
      gradients     T p / S2 + min(T / S1, DS_SUB_GROUP_ELEMS) F   (partition in the model dtype, then the fp32
                                        copy the optimizer steps on; S1 = S from stage 1, S2 = S from stage 2)
      optimizer     T / S1 (2 F + F)   (AdamW m and v, fp32 master unless training in fp32)
      zero_buffers  stage 3: (DS_PREFETCH_BUCKET_ELEMS + largest gathered unit) p when S > 1 (a decoder layer,
                    the embedding or lm_head, whichever is largest); stage >= 2: DS_REDUCE_BUCKET_ELEMS p when
                    anything trains; plus the full-size gradient of the largest trainable module
      activations   checkpointing: (L + 1) h p t + globals; else sum over layers of `layer_saved_terms` t + globals
      layer_backward  (checkpointing: max over modes of saved terms) + `backward_working_set`, times t
      logits_loss   `loss_terms`
      overhead      FRAGMENTATION x (activations + max(layer_backward, logits_loss)) + RUNTIME_RESERVED_GIB
    where t = local tokens = micro_batch x seq_len / SP and globals = (h F + h p + 2 d p) t (final norm, its
    output for the loss, RoPE cos/sin).
    """
    validate(shape, setup)
    p, tokens = DTYPE_BYTES[setup.dtype], setup.local_tokens
    group = setup.shard_group
    stage = setup.zero_stage
    params = count_params(shape, setup)
    weights_shard = group if stage == 3 else 1
    opt_shard = group if stage >= 1 else 1
    grad_shard = group if stage >= 2 else 1

    weights = (params.total + params.adapters) * p / weights_shard
    teacher = params.total * p / group if setup.trainable in ("linear", "full") else 0.0
    trainable = params.trainable
    gradients = trainable * p / grad_shard + min(trainable / opt_shard, DS_SUB_GROUP_ELEMS) * FP32
    optimizer = trainable / opt_shard * (2 * FP32 + (FP32 if p < FP32 else 0))

    zero_buffers = params.largest_trainable_unit * p
    if stage >= 2 and trainable:
        zero_buffers += DS_REDUCE_BUCKET_ELEMS * p
    if stage == 3 and group > 1:
        largest_gathered = max(params.layer, params.embedding, params.lm_head)
        zero_buffers += (DS_PREFETCH_BUCKET_ELEMS + largest_gathered) * p

    modes = layer_modes(shape, setup)
    saved = {mode: _weighted(layer_saved_terms(shape, setup, mode), coeffs) for mode in modes}
    backward = {mode: _weighted(layer_backward_terms(shape, setup, mode), coeffs) for mode in modes}
    x = _local_dims(shape, setup)
    globals_per_token = coeffs.globals * (x.h * FP32 + x.h * p + 2 * x.d * p)
    if setup.activation_checkpointing:
        kept = coeffs.checkpoint * (shape.num_layers + 1) * x.h * p + globals_per_token
        per_layer = max(sum(saved[m].values()) + backward_working_set(backward[m]) for m in modes)
    else:
        kept = sum(n * sum(saved[m].values()) for m, n in modes.items()) + globals_per_token
        per_layer = max(backward_working_set(backward[m]) for m in modes)
    activations, layer_backward = kept * tokens, per_layer * tokens
    losses = _weighted(loss_terms(shape, setup), coeffs)
    logits_loss = sum(losses.values())
    overhead = FRAGMENTATION * (activations + max(layer_backward, logits_loss)) + RUNTIME_RESERVED_GIB * GIB

    sequences = setup.micro_batch * setup.grad_accum * setup.data_parallel
    terms = {"saved_per_token": saved, "backward_per_token": backward, "loss": losses}
    return MemoryEstimate(weights, teacher, gradients, optimizer, zero_buffers, activations, layer_backward,
                          logits_loss, overhead, sequences * setup.seq_len, sequences, params.total,
                          params.trainable, setup.resolved_full_layers(shape), terms)


def max_seq_len(shape: ModelShape, setup: EstimateSetup, gpu_memory_gib: float,
                coeffs: ActivationCoefficients = DEFAULT_COEFFICIENTS) -> int | None:
    """The longest seq_len (a multiple of lcm(SEQ_LEN_STEP, SP), at most MAX_SEQ_LEN_SEARCH) whose estimate fits
    `gpu_memory_gib`, by bisection (memory grows with seq_len); None when even the shortest step does not fit."""
    step = math.lcm(SEQ_LEN_STEP, setup.sequence_parallel)

    def fits(multiple: int) -> bool:
        trial = dataclasses.replace(setup, seq_len=multiple * step)
        return estimate(shape, trial, coeffs).fits(gpu_memory_gib)

    if not fits(1):
        return None
    lo, hi = 1, MAX_SEQ_LEN_SEARCH // step  # invariant: lo fits; hi fits only if it is the search's ceiling
    if fits(hi):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# ----------------------------------------------------------------------------------------- dry run of a recipe
# (the one part of this module that imports torch, inside dry_run: the meta build lives in parallel/dry_run.py)

DRY_RUN_STAGES = ("gate_search", "distill", "long_context")  # gate search reads `search`, the others `distill`


def recipe_model_shape(model_path: str | None, teacher=None) -> ModelShape:
    """The shape of a recipe's model without its weights: model.path's config.json; else the preset its name spells
    (the shipped recipes name directories a laptop lacks); else, for model.path null, the embedded teacher."""
    from pathlib import Path

    if model_path is None:
        return ModelShape.from_teacher(teacher)
    if (Path(model_path) / "config.json").is_file():
        return ModelShape.from_model_dir(model_path, f"model.path={model_path}", morphable=False)
    preset = preset_named_by(Path(model_path).name)
    if preset is None:
        raise ConfigError(f"model.path={model_path} holds no config.json and names no preset "
                          f"({', '.join(PRESETS)}); point it at a HF model directory (--override model.path=DIR)")
    return PRESETS[preset]


def recipe_setup(recipe_path, world_size: int, stage: str, overrides=()) -> tuple[ModelShape, EstimateSetup]:
    """The model shape and EstimateSetup of a stage recipe (recipes/*.yaml) at `world_size` GPUs."""
    from pathlib import Path

    from flashmorph.config import DistillRecipe, GateSearchRecipe, load_recipe
    from flashmorph.model.layout import read_layout
    from flashmorph.parallel.layout import check_gate_granularity, layout_from_config

    check_choice("stage", stage, DRY_RUN_STAGES)
    recipe = load_recipe(recipe_path, list(overrides), GateSearchRecipe if stage == "gate_search" else DistillRecipe)
    layout = layout_from_config(recipe.parallel, world_size)
    common = dict(gpus=world_size, tensor_parallel=layout.tensor, sequence_parallel=layout.sequence,
                  dtype=recipe.model.dtype, activation_checkpointing=recipe.model.activation_checkpointing,
                  zero_stage=recipe.parallel.zero_stage)
    if stage == "gate_search":
        check_gate_granularity(layout, recipe.morph.gate_granularity)  # as validate_recipe refuses it
        shape = recipe_model_shape(recipe.model.path, recipe.teacher)
        return shape, EstimateSetup(**common, seq_len=recipe.data.seq_len, micro_batch=recipe.search.micro_batch_size,
                                    grad_accum=recipe.search.grad_accum_steps, trainable="gates", full_layers="mixed")
    shape, cfg = recipe_model_shape(recipe.model.path), recipe.distill
    hybrid = recipe.student.layout
    full = read_layout(hybrid, shape.num_layers).count("full") if hybrid and Path(hybrid).is_file() else None
    return shape, EstimateSetup(**common, seq_len=recipe.max_seq_len, micro_batch=cfg.micro_batch_size,
                                grad_accum=cfg.grad_accum_steps, trainable=cfg.trainable, lora_rank=cfg.lora_rank,
                                lora_modules=tuple(cfg.lora_targets),
                                lora_linear_layers_only=cfg.lora_linear_layers_only, full_layers=full,
                                loss_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk)


@dataclass
class DryRunReport:
    """One rank of a recipe's run, without weights: meta-built parameter counts, the estimate, the collectives."""

    shape: ModelShape
    setup: EstimateSetup
    params: object  # parallel.dry_run.RankParams
    memory: MemoryEstimate
    collectives: list  # parallel.dry_run.Collective


def dry_run(recipe_path, world_size: int, stage: str, overrides=()) -> DryRunReport:
    """Build the recipe's model on the meta device, apply its layout at `world_size` ranks to count one rank's
    parameters, estimate its memory (`estimate`) and list the collectives of one optimizer step."""
    from flashmorph.parallel.dry_run import StepShape, communication_plan, rank_params

    shape, setup = recipe_setup(recipe_path, world_size, stage, overrides)
    memory = estimate(shape, setup)  # validates the layout against the model first
    params = rank_params(shape, setup.tensor_parallel)
    if params.per_tp_rank != round(memory.params_total):
        raise ConfigError(f"the meta build of {shape.name} holds {params.per_tp_rank} parameters per TP rank, the "
                          f"estimator counts {round(memory.params_total)}; its ModelShape misses a weight")
    layout = resolve_layout(setup.tensor_parallel, setup.sequence_parallel, world_size)
    step = StepShape(setup.local_tokens, setup.grad_accum, DTYPE_BYTES[setup.dtype], memory.params_trainable,
                     setup.activation_checkpointing, setup.zero_stage, setup.trainable != "gates")
    return DryRunReport(shape, setup, params, memory, communication_plan(shape, layout, step, params))


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


DRY_RUN_GPU_GIB = (80, 141)  # H100 / H200 memory, for the dry run's fit line


def format_dry_run(report: DryRunReport) -> str:
    s, m, params = report.setup, report.memory, report.params
    p = DTYPE_BYTES[s.dtype]
    lines = [
        f"dry run: {report.shape.name}, {s.gpus} ranks = TP {s.tensor_parallel} x SP {s.sequence_parallel} x DP "
        f"{s.data_parallel}, ZeRO-{s.zero_stage}, {s.dtype}, trainable={s.trainable}, seq_len {s.seq_len}, "
        f"micro batch {s.micro_batch} x {s.grad_accum} accumulation",
        f"parameters: {params.total:,} in the model; {params.per_tp_rank:,} per TP rank "
        + "(" + ", ".join(f"{kind} {n:,}" for kind, n in sorted(params.by_kind.items())) + "); "
        f"{m.params_trainable:,.0f} trainable per TP rank",
        "per rank (estimated, see docs/estimate.md):",
    ]
    lines += [f"  {name:<16} {_size(getattr(m, name))}" for name in MemoryEstimate.COMPONENTS]
    lines += [f"  {'total':<16} {_size(m.total)}  (weights {_size(params.per_tp_rank * p)} per TP rank before "
              f"ZeRO)", "  fits one GPU of: " + ", ".join(f"{gib} GiB {'yes' if m.fits(gib) else 'no'}"
                                                    for gib in DRY_RUN_GPU_GIB),
              "communication per optimizer step and rank:"]
    if not report.collectives:
        lines.append("  none (one rank, or nothing sharded)")
    for c in report.collectives:
        lines.append(f"  {c.op:<14} over {c.group:<7} {c.per_step:>6} x {_size(c.bytes_each):>10} = "
                     f"{_size(c.bytes_per_step):>10}  {c.what}")
    return "\n".join(lines)


def dry_run_main(recipe, world_size: int, stage: str, overrides=()) -> str:
    """What a launcher's --dry-run prints: `format_dry_run(dry_run(...))`; no weights are read or allocated."""
    return format_dry_run(dry_run(recipe, world_size, stage, overrides))
