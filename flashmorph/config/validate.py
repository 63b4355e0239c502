"""Validation before any model is built: each rule once, reading config.json / hybrid.json headers only."""

import dataclasses
import math
from pathlib import Path

from flashmorph.config.recipes import DistillRecipe, GateSearchRecipe
from flashmorph.config.sections import (MIN_TEXT_VOCAB, REGULARIZERS, TEACHER_DEVICES, TRAINABLE_SETS, DistillConfig,
                                        TeacherConfig)
from flashmorph.errors import ConfigError, check_choice
from flashmorph.model.hf_dir import validate_model_dir
from flashmorph.model.layout import read_layout
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.layout import check_gate_granularity, check_layout, layout_from_config
from flashmorph.run_dir import RunDir


def model_shape(recipe: GateSearchRecipe | DistillRecipe) -> ModelShape:
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


def validate_recipe(recipe: GateSearchRecipe, world_size: int = 1) -> ModelShape:
    """Raise ConfigError on the first problem; returns the model shape it read. Builds nothing.
    `world_size`: the ranks the launcher started, which the TP x SP x DP layout must tile."""
    run, model, search, parallel = recipe.run, recipe.model, recipe.search, recipe.parallel
    run.validate()
    model.validate_dtype()
    if model.path is not None and not Path(model.path).is_dir():
        raise ConfigError(f"model.path={model.path} does not exist; give a local HF model directory or null for the embedded teacher")
    recipe.morph.validate()
    shape = model_shape(recipe)
    num_full_layers(search.budget, shape.num_layers)  # a one-line ConfigError for a budget the model cannot have
    check_choice("search.regularizer", search.regularizer, REGULARIZERS)
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
    layout = layout_from_config(parallel, world_size)
    check_gate_granularity(layout, recipe.morph.gate_granularity)
    check_layout(layout, shape, recipe.data.seq_len)
    if model.path is None:
        validate_teacher(recipe.teacher)
    recipe.data.validate(vocab_size=shape.vocab_size if model.path is None else None)
    return shape


def validate_teacher(teacher: TeacherConfig) -> None:
    from flashmorph.model.families import SUPPORTED_MODEL_TYPES as FAMILIES

    check_choice("teacher.family", teacher.family, FAMILIES)
    if teacher.hidden_size % teacher.num_heads or teacher.num_heads % teacher.num_kv_heads:
        raise ConfigError("teacher.hidden_size must be divisible by teacher.num_heads, and num_heads by num_kv_heads")
    if not teacher.curriculum or min(teacher.curriculum) < 1:
        raise ConfigError("teacher.curriculum must list pair counts >= 1, e.g. [2, 4, 6, 8]")
    if teacher.max_steps_per_stage < 1 or teacher.batch_size < 1:
        raise ConfigError("teacher.max_steps_per_stage and teacher.batch_size must be >= 1")
    if not 0.0 < teacher.advance_accuracy <= 1.0:
        raise ConfigError(f"teacher.advance_accuracy={teacher.advance_accuracy} must be in (0, 1]; e.g. 0.9")
    check_choice("teacher.device", teacher.device, TEACHER_DEVICES)
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
    validate_distill_section(distill)
    parallel.validate_deepspeed()
    layout = layout_from_config(parallel, world_size)
    for seq_len in ([s.seq_len for s in distill.length_schedule] or [recipe.data.seq_len]):
        check_layout(layout, shape, seq_len)
    for stage_len in [s.seq_len for s in distill.length_schedule] or [recipe.data.seq_len]:
        dataclasses.replace(recipe.data, seq_len=stage_len).validate()
    recipe.text.validate()
    return shape


def validate_distill_section(d: DistillConfig) -> None:
    check_choice("distill.trainable", d.trainable, TRAINABLE_SETS)
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


def validate(recipe: GateSearchRecipe | DistillRecipe, world_size: int = 1) -> ModelShape:
    """Either recipe tree, checked before anything is built; the model shape it read from config.json."""
    if isinstance(recipe, DistillRecipe):
        return validate_distill_recipe(recipe, world_size)
    return validate_recipe(recipe, world_size)
