"""The dry run (estimate.dry_run_main over parallel.dry_run): every stage recipe at several world sizes builds its
model on meta, counts one rank's parameters by the TP rules, estimates memory and lists the collectives."""

import json
from pathlib import Path

import pytest

from flashmorph.errors import ConfigError
from flashmorph.estimate import PRESETS, dry_run, dry_run_main, format_dry_run
from flashmorph.parallel.dry_run import rank_params

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def _stage(path: Path) -> str:
    for stage in ("gate_search", "long_context", "distill"):
        if path.stem.endswith(stage):
            return stage
    return "gate_search"  # embedded.yaml: the embedded teacher's gate search


@pytest.fixture(scope="module")
def embedded_teacher(tmp_path_factory):
    """The config.json the embedded gate search leaves in runs/embedded/teacher (its recipe's teacher section)."""
    from flashmorph.model.tiny import tiny_config

    out = tmp_path_factory.mktemp("teacher")
    config = tiny_config("llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=64)
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_dry_run_every_recipe(recipe, embedded_teacher):
    overrides = [f"model.path={embedded_teacher}"] if recipe.stem.startswith("embedded_") else []
    ran = 0
    for world in (1, 8, 64):
        try:
            report = dry_run(recipe, world, _stage(recipe), overrides)
        except ConfigError as err:  # a recipe may refuse a world size (its layouts); the refusal names the fix
            assert "world_size" in str(err) or "parallel" in str(err), err
            continue
        params, memory, setup = report.params, report.memory, report.setup
        assert params.per_tp_rank == round(memory.params_total) and params.total >= params.per_tp_rank
        ops = {(c.op, c.group) for c in report.collectives}
        assert (("all_gather", "sp x dp") in ops) == (setup.zero_stage == 3 and setup.shard_group > 1)
        assert (("all_reduce", "tp") in ops) == (setup.tensor_parallel > 1)
        assert (("all_to_all", "sp") in ops) == (setup.sequence_parallel > 1)
        text = format_dry_run(report) if world != 8 else dry_run_main(recipe, world, _stage(recipe), overrides)
        assert f"{world} ranks = TP {setup.tensor_parallel} x SP {setup.sequence_parallel}" in text
        ran += 1
    assert ran >= 1, "every recipe must dry-run at some world size"


def test_meta_counts_match_published_sizes():
    # the meta build, not a formula: Llama-3-8B has 8.03e9 parameters, Llama-3-70B 70.55e9, Qwen3-32B 32.76e9
    assert rank_params(PRESETS["llama3-8b"], 1).total == 8_030_261_248
    assert rank_params(PRESETS["llama3-70b"], 1).total == 70_553_706_496
    assert rank_params(PRESETS["qwen3-32b"], 1).total == 32_762_123_264
    tp8 = rank_params(PRESETS["llama3-70b"], 8)
    # projections split 8 ways; embedding, lm_head (128256 x 8192 each) and norms stay whole on every rank
    assert tp8.by_kind["replicated"] == 2 * 128256 * 8192 + (2 * 80 + 1) * 8192
    assert tp8.per_tp_rank == tp8.by_kind["replicated"] + (70_553_706_496 - tp8.by_kind["replicated"]) // 8


def test_tp_plan_counts_and_sizes():
    from flashmorph.parallel.dry_run import StepShape, communication_plan
    from flashmorph.parallel.layout import resolve_layout

    shape = PRESETS["llama3-70b"]
    step = StepShape(local_tokens=4096, micro_steps=2, dtype_bytes=2, trainable_per_tp_rank=1e6, checkpointing=True,
                     zero_stage=3, teacher=False)
    plan = communication_plan(shape, resolve_layout(4, 2, 16), step, rank_params(shape, 4))
    by_what = {(c.op, c.group, c.what.split(" (")[0]): c for c in plan}
    forward = by_what[("all_reduce", "tp", "o_proj + down_proj output")]
    assert forward.per_step == 2 * 2 * 80 * 2 and forward.bytes_each == 4096 * 8192 * 2  # 2 per layer, recompute
    assert by_what[("all_reduce", "tp", "q/k/v/gate/up input gradient")].per_step == 5 * 2 * 80
    attention = by_what[("all_to_all", "sp", "q, k, v in and attention out")]
    assert attention.per_step == 4 * 2 * 80 * 2  # 16 heads and 2 kv heads per TP rank, head_dim 128
    assert attention.bytes_each == 4096 * (2 * 16 + 2 * 2) * 128 * 2 / 4
    assert by_what[("reduce_scatter", "sp x dp", "trainable gradients")].per_step == 2


def test_dry_run_refusals(embedded_teacher):
    recipe = RECIPES[0].parent / "llama3_8b_distill.yaml"
    with pytest.raises(ConfigError, match="stage='train' is unknown"):
        dry_run_main(recipe, 8, "train")
    with pytest.raises(ConfigError, match="holds no config.json and names no preset"):
        dry_run_main(recipe, 8, "distill", ["model.path=/nowhere/mystery-model"])
    with pytest.raises(ConfigError, match="not divisible"):  # world 6 does not split TP=4
        dry_run_main(recipe, 6, "distill", ["parallel.tensor_parallel=4", "distill.trainable=linear"])


@pytest.mark.parametrize("command, recipe", [("gate_search", "llama3_70b_gate_search"),
                                             ("distill", "qwen3_32b_distill"),
                                             ("long_context", "llama3_70b_long_context")])
def test_every_stage_launcher_dry_runs_without_weights_or_files(command, recipe, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)  # a run would write runs/... here
    main = importlib.import_module(f"flashmorph.cli.{command}").main
    path = str(Path(__file__).resolve().parents[2] / "recipes" / f"{recipe}.yaml")
    assert main(["--config", path, "--dry-run", "--world-size", "16"]) == 0
    out = capsys.readouterr().out
    assert out == dry_run_main(path, 16, command) + "\n"
    assert out.startswith("dry run: ") and " 16 ranks = " in out and "fits one GPU of: 80 GiB " in out
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("WORLD_SIZE", "4")  # under a launcher the world size comes from its environment
    assert main(["--config", path, "--dry-run"]) == 0
    assert " 4 ranks = " in capsys.readouterr().out


def test_a_dry_run_of_an_impossible_layout_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from flashmorph.cli.gate_search import main

    monkeypatch.chdir(tmp_path)
    path = str(Path(__file__).resolve().parents[2] / "recipes" / "llama3_70b_gate_search.yaml")
    # the recipe's layouts name 1, 8 and 64 GPUs; at 6 its parallel.tensor_parallel applies
    assert main(["--config", path, "--dry-run", "--world-size", "6", "--override",
                 "parallel.tensor_parallel=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: world_size=6 is not divisible by parallel.tensor_parallel=4")
    with pytest.raises(SystemExit):
        main(["--config", path, "--dry-run", "--world-size", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a real run's world size comes from its launcher
        main(["--config", path, "--world-size", "8"])
    assert "--world-size goes with --dry-run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_dry_run_refuses_what_the_run_refuses_and_plans_the_lora_teacher_pass():
    path = Path(__file__).resolve().parents[2] / "recipes" / "llama3_70b_gate_search.yaml"
    with pytest.raises(ConfigError, match="gate_granularity=head cannot run with parallel.tensor_parallel=8"):
        dry_run(path, 8, "gate_search", ["morph.gate_granularity=head", "parallel.layouts={}",
                                          "parallel.tensor_parallel=8"])
    # LoRA's teacher is the student's base with adapters off: a second forward with its own TP all-reduces
    distill = Path(__file__).resolve().parents[2] / "recipes" / "llama3_70b_distill.yaml"
    plans = {trainable: {c.op: c.per_step for c in dry_run(distill, 8, "distill", [f"distill.trainable={trainable}",
                                                                                     "parallel.layouts={}",
                                                                                     "parallel.tensor_parallel=8"]
                                                                     ).collectives}
             for trainable in ("lora", "full")}
    assert plans["lora"]["all_reduce"] == plans["full"]["all_reduce"] > 0
