"""Recipes: YAML + overrides load into dataclasses; each bad config is one clear line, and nothing is written."""

from pathlib import Path

import pytest

from flashmorph.cli import gate_search
from flashmorph.config import GateSearchRecipe, load_recipe, validate_recipe
from flashmorph.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_file_then_overrides(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("search:\n  steps: 7\n  lr: 1\ndata:\n  tasks: {mqar: 2, niah_single: 1}\n")
    recipe = load_recipe(recipe_file, ["search.steps=9", "model.path=null", "teacher.curriculum=[2, 4]"])
    assert isinstance(recipe, GateSearchRecipe)
    assert recipe.search.steps == 9 and recipe.search.lr == 1.0 and isinstance(recipe.search.lr, float)
    assert recipe.data.tasks == {"mqar": 2.0, "niah_single": 1.0}
    assert recipe.teacher.curriculum == [2, 4]
    assert recipe.search.budget == 0.5  # default kept


def _recipe_class(path):
    from flashmorph.config import DistillRecipe

    return DistillRecipe if path.stem.endswith(("_distill", "_long_context")) else GateSearchRecipe


def test_every_shipped_recipe_loads():
    paths = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(paths) >= 17  # embedded x3 + 5 models x 3 stages
    for path in paths:
        load_recipe(path, cls=_recipe_class(path))


def test_every_recipe_layout_fits_its_model():
    """Each GPU count a recipe names gets TP x SP degrees that divide the GPUs and the published model shape."""
    from flashmorph.estimate import PRESETS
    from flashmorph.parallel.layout import check_layout, layout_from_config

    checked = 0
    for path in sorted((ROOT / "recipes").glob("*_*b_*.yaml")):
        recipe = load_recipe(path, cls=_recipe_class(path))
        family, size = path.stem.split("_")[:2]  # llama3_70b_distill -> llama3-70b
        shape = PRESETS[f"{family}-{size}"]
        lengths = [s.seq_len for s in getattr(getattr(recipe, "distill", None), "length_schedule", [])]
        for gpus in recipe.parallel.layouts:
            layout = layout_from_config(recipe.parallel, gpus)
            for seq_len in lengths or [recipe.data.seq_len]:
                check_layout(layout, shape, seq_len)
            checked += 1
    assert checked == 45  # 5 models x 3 stages x {1, 8, 64} GPUs


BAD_CASES = [
    (["search.budget=9"], "search.budget"),
    (["search.budget=1.5"], "search.budget"),
    (["data.tasks={needle_in_space: 1.0}"], "data.tasks"),
    (["model.path=/nonexistent/model"], "model.path"),
    (["parallel.sequence_parallel=3"], "parallel.sequence_parallel"),
    (["parallel.tensor_parallel=8"], "tensor_parallel"),
    (["parallel.sequence_parallel=2"], "world_size=1 is not divisible by parallel.tensor_parallel=1 x "
                                       "parallel.sequence_parallel=2"),  # the launcher started one rank
    (["search.stepz=3"], "search.stepz"),
    (["search.steps=many"], "search.steps"),
    (["search.regularizer=l1"], "search.regularizer"),
    (["morph.gate_init=1.0"], "morph.gate_init"),
    (["morph.linear_backend=cuda"], "morph.linear_backend"),
    (["model.dtype=fp8"], "model.dtype"),
    (["data.seq_len=10"], "data.seq_len"),
]


@pytest.mark.parametrize("overrides,field", BAD_CASES)
def test_bad_config_is_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys, overrides, field):
    run_dir = tmp_path / "run"
    argv = ["--config", str(ROOT / "recipes" / "embedded.yaml"), "--override", f"run.run_dir={run_dir}"]
    for item in overrides:
        argv += ["--override", item]
    code = gate_search.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and field in err[0], err
    assert not run_dir.exists()


@pytest.mark.parametrize("world, overrides, message", [
    (2, ["parallel.tensor_parallel=2", "morph.gate_granularity=head"], "morph.gate_granularity=head cannot run "
                                                                         "with parallel.tensor_parallel=2"),
    (4, ["parallel.sequence_parallel=4", "data.seq_len=50"], "data.seq_len"),
    (8, ["parallel.tensor_parallel=8"], "parallel.tensor_parallel=8 does not divide the model's num_heads=4"),
])
def test_gate_search_layout_is_checked_against_the_launchers_world(tmp_path, capsys, monkeypatch, world, overrides,
                                                                   message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["--config", str(ROOT / "recipes" / "embedded.yaml"), "--override", f"run.run_dir={tmp_path / 'run'}"]
    for item in overrides:
        argv += ["--override", item]
    assert gate_search.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_gate_search_runs_under_every_layout_that_tiles_the_world():
    for tensor, sequence in ((2, 1), (1, 2), (2, 2)):
        recipe = load_recipe(ROOT / "recipes" / "embedded.yaml", [f"parallel.tensor_parallel={tensor}",
                                                                  f"parallel.sequence_parallel={sequence}"])
        assert validate_recipe(recipe, world_size=4).num_layers == 4


def test_missing_recipe_file(capsys, tmp_path):
    assert gate_search.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config" in capsys.readouterr().err


def test_budget_counts_and_fractions():
    recipe = load_recipe(ROOT / "recipes" / "embedded.yaml", ["search.budget=0.25"])
    validate_recipe(recipe)
    recipe = load_recipe(ROOT / "recipes" / "embedded.yaml", ["search.budget=4"])
    validate_recipe(recipe)
    with pytest.raises(ConfigError, match="search.budget=5 exceeds the 4 layers"):
        validate_recipe(load_recipe(ROOT / "recipes" / "embedded.yaml", ["search.budget=5"]))
