"""Recipe dataclasses, YAML loading with --override a.b=c, and validation before any model is built."""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flashmorph.data.config import DataConfig
from flashmorph.errors import ConfigError
from flashmorph.model.config import DTYPES, MorphConfig
from flashmorph.model.hf_dir import validate_model_dir
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.layout import ParallelLayout, check_layout

REGULARIZERS = ("mean", "budget")
TEACHER_DEVICES = ("auto", "cpu", "cuda")
MIN_TEXT_VOCAB = 6 + 6 * 256  # synthetic token space: ~1/6 of the non-special ids are filler, text needs 256 of them


@dataclass
class ModelConfig:
    path: str | None = None  # HF model directory; null = build and train the embedded tiny teacher
    dtype: str = "bfloat16"  # weights/activations dtype: float32, bfloat16 or float16
    activation_checkpointing: bool = False  # recompute decoder layers in backward (needed at long context)

    def validate_dtype(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is unknown; use one of {DTYPES}")


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
class GateSearchRecipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    morph: MorphConfig = field(default_factory=MorphConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp` (dataclasses recursively); ints widen to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r} must be one of: {' | '.join(_type_name(o) for o in options)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r} must be a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} must be an int")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where}={value!r} must be {_type_name(tp)}")


def _from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown field {prefix}{unknown[0]}; valid fields: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml-parsed c), so numbers, booleans, null and lists work as in YAML."""
    if "=" not in text:
        raise ConfigError(f"--override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key.strip(), raw


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), cls=GateSearchRecipe):
    """Build the recipe from defaults, then the YAML file, then the overrides, in that order."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path} does not exist; pass a recipe from recipes/")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path} must hold a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return _from_dict(cls, tree)


# --------------------------------------------------------------------------------------- validation


def model_shape(recipe: GateSearchRecipe) -> ModelShape:
    """The model's shape from config.json (or the teacher section), without building a model."""
    if recipe.model.path is None:
        return ModelShape.from_teacher(recipe.teacher)
    # family, keys and their types, weights present and not truncated, tokenizer ids: hf_dir.validate_model_dir
    return validate_model_dir(recipe.model.path, f"model.path={recipe.model.path}")


def resolve_budget(budget, total: int, field: str = "--budget", unit: str = "layers", hybrid: bool = False) -> int:
    """The one full-attention budget rule: a count of `unit` out of `total` (an int is the count, a float a fraction);
    anything else is a one-line ConfigError naming `field`.

    Gate search, discretization and the baselines take counts in [0, total] and fractions in [0, 1] rounded with
    round() (half to even), so all of them pick the same k. hybrid=True (the selection experiment, whose layouts
    need both kinds of layer): counts in [1, total - 1], fractions in (0, 1) rounded half up, at least 1.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"{field}={budget!r} must be a count (int) or a fraction (float in [0, 1])")
    if isinstance(budget, float):
        inside = 0.0 < budget < 1.0 if hybrid else 0.0 <= budget <= 1.0
        if not (math.isfinite(budget) and inside):
            raise ConfigError(f"{field}={budget} as a fraction must lie in {'(0, 1)' if hybrid else '[0, 1]'}; or "
                              f"give a count of {unit} as an int")
        return max(1, math.floor(budget * total + 0.5)) if hybrid else round(budget * total)
    if hybrid and not 1 <= budget < total:
        raise ConfigError(f"{field}={budget} must keep 1..{total - 1} of the {total} {unit}")
    if budget < 0:
        raise ConfigError(f"{field}={budget} must be >= 0 (0 makes every one of the {unit} linear)")
    if budget > total:
        raise ConfigError(f"{field}={budget} exceeds the {total} {unit}; give at most {total}, or a fraction in [0, 1]")
    return budget


def num_full_layers(budget: int | float, num_layers: int) -> int:
    """search.budget as a count of full-attention layers (resolve_budget's rule)."""
    return resolve_budget(budget, num_layers, "search.budget")


def validate_recipe(recipe: GateSearchRecipe) -> ModelShape:
    """Raise ConfigError on the first problem; returns the model shape it read. Builds nothing."""
    run, model, search, parallel = recipe.run, recipe.model, recipe.search, recipe.parallel
    run.validate()
    model.validate_dtype()
    if model.path is not None and not Path(model.path).is_dir():
        raise ConfigError(f"model.path={model.path} does not exist; give a local HF model directory or null for the embedded teacher")
    recipe.morph.validate()
    shape = model_shape(recipe)
    num_full_layers(search.budget, shape.num_layers)  # a one-line ConfigError for a budget the model cannot have
    if search.regularizer not in REGULARIZERS:
        raise ConfigError(f"search.regularizer={search.regularizer!r} is unknown; use one of {REGULARIZERS}")
    for name in ("steps", "micro_batch_size", "grad_accum_steps", "log_every", "max_bad_steps"):
        if getattr(search, name) < 1:
            raise ConfigError(f"search.{name}={getattr(search, name)} must be >= 1")
    for name in ("save_every", "reg_warmup_steps", "keep_last"):
        if getattr(search, name) < 0:
            raise ConfigError(f"search.{name}={getattr(search, name)} must be >= 0")
    if search.lr <= 0:
        raise ConfigError(f"search.lr={search.lr} must be > 0")
    for name in ("weight_decay", "grad_clip", "reg_weight"):  # torch/DeepSpeed would refuse them after the run dir exists
        if getattr(search, name) < 0:
            raise ConfigError(f"search.{name}={getattr(search, name)} must be >= 0 (0 turns it off)")
    parallel.validate_deepspeed()
    sp, tp = parallel.sequence_parallel, parallel.tensor_parallel
    check_layout(ParallelLayout(tensor=tp, sequence=sp, data=1), shape, recipe.data.seq_len)
    if sp > 1 or tp > 1:  # checked after the divisibility rules so a user learns every problem of the value
        raise ConfigError(f"parallel.sequence_parallel={sp}, tensor_parallel={tp}: gate search runs data-parallel "
                          "under ZeRO-3 only for now; set both to 1 (sequence/tensor parallelism arrive with "
                          "distillation)")
    if model.path is None:
        validate_teacher(recipe.teacher)
    recipe.data.validate(vocab_size=shape.vocab_size if model.path is None else None)
    return shape


def validate_teacher(teacher: TeacherConfig) -> None:
    from flashmorph.model.families import SUPPORTED_MODEL_TYPES as FAMILIES

    if teacher.family not in FAMILIES:
        raise ConfigError(f"teacher.family={teacher.family!r} is unknown; use one of {FAMILIES}")
    if teacher.hidden_size % teacher.num_heads or teacher.num_heads % teacher.num_kv_heads:
        raise ConfigError("teacher.hidden_size must be divisible by teacher.num_heads, and num_heads by num_kv_heads")
    if not teacher.curriculum or min(teacher.curriculum) < 1:
        raise ConfigError("teacher.curriculum must list pair counts >= 1, e.g. [2, 4, 6, 8]")
    if teacher.max_steps_per_stage < 1 or teacher.batch_size < 1:
        raise ConfigError("teacher.max_steps_per_stage and teacher.batch_size must be >= 1")
    if not 0.0 < teacher.advance_accuracy <= 1.0:
        raise ConfigError(f"teacher.advance_accuracy={teacher.advance_accuracy} must be in (0, 1]; e.g. 0.9")
    if teacher.device not in TEACHER_DEVICES:
        raise ConfigError(f"teacher.device={teacher.device!r} is unknown; use one of {TEACHER_DEVICES}")
    if min(teacher.text_batch_size, teacher.text_steps, teacher.log_every - 1, teacher.checkpoint_every) < 0:
        raise ConfigError("teacher.text_batch_size, text_steps and checkpoint_every must be >= 0, log_every >= 1")
    uses_text = teacher.text_batch_size > 0 or teacher.text_steps > 0
    if uses_text and teacher.text_batch_size < 1:
        raise ConfigError("teacher.text_steps > 0 needs teacher.text_batch_size >= 1 (text windows per step)")
    if uses_text and teacher.text_seq_len < 2:
        raise ConfigError(f"teacher.text_seq_len={teacher.text_seq_len} must be >= 2 tokens")
    if uses_text and teacher.vocab_size < MIN_TEXT_VOCAB:
        raise ConfigError(f"teacher.vocab_size={teacher.vocab_size} maps several bytes onto one token; use >= "
                          f"{MIN_TEXT_VOCAB} with teacher text, so each of the 256 bytes gets its own id")
    if teacher.intermediate_size is not None and teacher.intermediate_size < 1:
        raise ConfigError(f"teacher.intermediate_size={teacher.intermediate_size} must be >= 1 or null")
