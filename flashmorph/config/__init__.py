"""Recipes: one dataclass per section (sections.py), the gate-search and distill trees (recipes.py), YAML loading
with --override a.b=c (load.py), and the validation that runs before any model is built (validate.py)."""

from flashmorph.config.load import load_recipe, parse_override
from flashmorph.config.recipes import DistillRecipe, GateSearchRecipe
from flashmorph.config.sections import (DistillConfig, LayoutConfig, LengthStage, ModelConfig, ParallelConfig,
                                        RunConfig, SearchConfig, StudentConfig, TeacherConfig)
from flashmorph.config.validate import (check_init_from, model_shape, num_full_layers, resolve_budget, validate,
                                        validate_distill_recipe, validate_distill_section, validate_recipe,
                                        validate_teacher)

__all__ = [
    "DistillConfig", "DistillRecipe", "GateSearchRecipe", "LayoutConfig", "LengthStage", "ModelConfig",
    "ParallelConfig", "RunConfig", "SearchConfig", "StudentConfig", "TeacherConfig", "check_init_from",
    "load_recipe", "model_shape", "num_full_layers", "parse_override", "resolve_budget", "validate",
    "validate_distill_recipe", "validate_distill_section", "validate_recipe", "validate_teacher",
]
