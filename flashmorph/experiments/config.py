"""The selection experiment's recipe: dataclass sections loaded from YAML with --override, validated before any work."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashmorph.config import (DistillConfig, SearchConfig, TeacherConfig, load_recipe, resolve_budget,
                               validate_distill_section, validate_teacher)
from flashmorph.data.config import DataConfig
from flashmorph.errors import ConfigError, check_choice
from flashmorph.model.config import MorphConfig
from flashmorph.model.shape import ModelShape
from flashmorph.selection.baselines import KL_POSITIONS, PERIODIC_VARIANTS

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
NLL_DATA = ("text", "retrieval")


@dataclass
class SelectionSettings:
    budgets: list[int | float] = field(default_factory=lambda: [0.125, 0.25, 0.5])  # fractions (float) of the layers or counts (int)
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one random layout per seed and budget
    periodic_variant: str = "keep_first"  # baselines.periodic_indices variant
    score_batches: int = 8  # held-out batches leave-one-out / KL / NLL score on
    score_batch_size: int = 32  # samples per scoring batch
    kl_positions: str = "answer"  # KL on answer positions or on all positions
    nll_data: str = "text"  # NLL-guided scores on stdlib text windows ("text") or on all tokens of retrieval samples


@dataclass
class EvalSettings:
    length_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])  # recall at data.seq_len times these
    samples: int = 256  # held-out samples per length (the exhaustive reference uses the same set at 1x)
    batch_size: int = 64  # samples per forward
    ppl_window: int = 256  # tokens per perplexity window on held-out stdlib text (one byte = one token)
    ppl_max_tokens: int = 32768  # held-out text tokens scored for perplexity
    exhaustive_max_layouts: int = 500  # enumerate every layout of a budget when C(L, k) is at most this


@dataclass
class CostSettings:
    search_steps: list[int] = field(default_factory=lambda: [25, 50, 100, 200])  # gate-search prefixes (plus all steps)
    score_batches: list[int] = field(default_factory=lambda: [1, 2, 4])  # leave-one-out / KL batch counts (plus all)


@dataclass
class AblationSettings:
    threshold: float = 0.5  # threshold discretization of the main search's gates, against top-k
    reg_weights: list[float] = field(default_factory=lambda: [0.1, 2.0])  # extra searches; search.reg_weight is the reference
    head_granularity: bool = True  # one search with per-head gates, layers ranked by their mean gate
    text_weight: float = 0.25  # one search whose batches hold this share of stdlib text windows (0 = skip)


@dataclass
class ExperimentConfig:
    out_dir: str = "runs/experiments/selection"  # every part caches its results here; a rerun continues
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    dtype: str = "auto"  # model dtype of search, scoring, distillation and evaluation; auto: bfloat16 on cuda, else float32
    zero_stage: int = 0  # DeepSpeed ZeRO stage of gate search and distillation (one process: 0 partitions nothing)
    teacher_dir: str | None = None  # a trained teacher (HF directory); null = train `teacher` into <out_dir>/teacher
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    morph: MorphConfig = field(default_factory=MorphConfig)
    data: DataConfig = field(default_factory=DataConfig)  # retrieval format at the training length (search, scoring, eval)
    search: SearchConfig = field(default_factory=SearchConfig)  # gate search; its budget is ignored (selection.budgets)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    distill: DistillConfig = field(default_factory=DistillConfig)  # the same distillation for every layout
    distill_text_weight: float = 0.0  # share of stdlib text windows in distillation batches (0 = retrieval only)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    cost: CostSettings = field(default_factory=CostSettings)
    ablations: AblationSettings = field(default_factory=AblationSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    return load_recipe(path, list(overrides), cls=ExperimentConfig)


def budget_layers(budget: int | float, num_layers: int, field: str = "selection.budgets entry") -> int:
    """A budget as a count of full-attention layers of a hybrid: a float is a fraction of the layers rounded half up
    (1/8 of 12 = 1.5 -> 2; Python's round() would give 2 for 1.5 but 2 for 2.5 too), at least 1; an int is the
    count (config.resolve_budget, hybrid=True)."""
    return resolve_budget(budget, num_layers, field, hybrid=True)


def layer_budgets(cfg: ExperimentConfig, num_layers: int) -> list[int]:
    """The distinct layer counts of selection.budgets, ascending (1/8 and 1/4 of 4 layers are both 1)."""
    budgets = cfg.selection.budgets
    return sorted({budget_layers(b, num_layers, f"selection.budgets[{i}]") for i, b in enumerate(budgets)})


def teacher_shape(cfg: ExperimentConfig) -> ModelShape:
    """The teacher's shape, from its config.json or the teacher section; builds nothing."""
    if cfg.teacher_dir is None:
        return ModelShape.from_teacher(cfg.teacher)
    return ModelShape.from_model_dir(cfg.teacher_dir, f"teacher_dir={cfg.teacher_dir}")


def validate_experiment(cfg: ExperimentConfig) -> ModelShape:
    """One-line ConfigError on the first problem, before any model is built; returns the teacher shape."""
    check_choice("device", cfg.device, DEVICES)
    check_choice("dtype", cfg.dtype, DTYPES)
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage={cfg.zero_stage} must be 0, 1, 2 or 3")
    if cfg.teacher_dir is not None and not Path(cfg.teacher_dir).is_dir():
        raise ConfigError(f"teacher_dir={cfg.teacher_dir} does not exist; give a trained teacher or null to train one")
    if cfg.teacher_dir is None:
        validate_teacher(cfg.teacher)
    shape = teacher_shape(cfg)
    layers = shape.num_layers
    cfg.morph.validate()
    cfg.data.validate(vocab_size=shape.vocab_size)
    sel, ev, cost, abl, search = cfg.selection, cfg.evaluation, cfg.cost, cfg.ablations, cfg.search
    if not sel.budgets:
        raise ConfigError("selection.budgets is empty; give fractions such as [0.125, 0.25, 0.5]")
    layer_budgets(cfg, layers)
    if not sel.random_seeds or len(set(sel.random_seeds)) != len(sel.random_seeds):
        raise ConfigError(f"selection.random_seeds={sel.random_seeds} must list distinct seeds, e.g. [0, 1, 2]")
    check_choice("selection.periodic_variant", sel.periodic_variant, PERIODIC_VARIANTS)
    check_choice("selection.kl_positions", sel.kl_positions, KL_POSITIONS)
    check_choice("selection.nll_data", sel.nll_data, NLL_DATA)
    if sel.score_batches < 1 or sel.score_batch_size < 1:
        raise ConfigError("selection.score_batches and selection.score_batch_size must be >= 1")
    if search.steps < 1 or search.micro_batch_size < 1 or search.grad_accum_steps < 1 or search.lr <= 0:
        raise ConfigError("search.steps, micro_batch_size and grad_accum_steps must be >= 1 and search.lr > 0")
    if not ev.length_multipliers or min(ev.length_multipliers) < 1 or 1 not in ev.length_multipliers:
        raise ConfigError(f"evaluation.length_multipliers={ev.length_multipliers} must include 1 (the training length)"
                          " and only integers >= 1, e.g. [1, 2, 4]")
    if ev.samples < 1 or ev.batch_size < 1 or ev.ppl_window < 2 or ev.ppl_max_tokens < ev.ppl_window:
        raise ConfigError("evaluation.samples and batch_size must be >= 1, ppl_window >= 2 and ppl_max_tokens >= "
                          "ppl_window")
    if ev.exhaustive_max_layouts < 0:
        raise ConfigError(f"evaluation.exhaustive_max_layouts={ev.exhaustive_max_layouts} must be >= 0 (0 = skip)")
    bad_steps = [s for s in cost.search_steps if not 1 <= s <= search.steps]
    if bad_steps:
        raise ConfigError(f"cost.search_steps entry {bad_steps[0]} must lie in [1, search.steps={search.steps}]")
    bad_batches = [n for n in cost.score_batches if not 1 <= n <= sel.score_batches]
    if bad_batches:
        raise ConfigError(f"cost.score_batches entry {bad_batches[0]} must lie in "
                          f"[1, selection.score_batches={sel.score_batches}]")
    if not 0.0 <= abl.threshold <= 1.0:
        raise ConfigError(f"ablations.threshold={abl.threshold} must be a gate value in [0, 1]")
    if any(w < 0 for w in abl.reg_weights):
        raise ConfigError(f"ablations.reg_weights={abl.reg_weights} must be >= 0")
    for name in ("text_weight",):
        if not 0.0 <= getattr(abl, name) < 1.0:
            raise ConfigError(f"ablations.{name}={getattr(abl, name)} must lie in [0, 1)")
    if not 0.0 <= cfg.distill_text_weight < 1.0:
        raise ConfigError(f"distill_text_weight={cfg.distill_text_weight} must lie in [0, 1)")
    validate_distill_section(cfg.distill)
    if cfg.distill.length_schedule:
        raise ConfigError("distill.length_schedule must be empty here: every layout distils at data.seq_len")
    return shape
