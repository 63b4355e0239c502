"""flashmorph.cli.teacher (launcher/teacher.py) on the proxy teacher's recipe in its tiny CPU mode: exit codes 0 / 3 /
75, the report, and a stopped run that the same command continues."""

import json
from pathlib import Path

import pytest

from flashmorph.cli import teacher as teacher_cli
from flashmorph.config import load_recipe, validate_teacher

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "experiments" / "proxy_teacher.yaml"
# the tiny CPU mode of the recipe: 2 layers at hidden 32, a few steps; tests the machinery, not the learning
TINY = ["teacher.device=cpu", "teacher.num_layers=2", "teacher.hidden_size=32", "teacher.num_heads=2",
        "teacher.num_kv_heads=1", "teacher.vocab_size=64", "teacher.batch_size=8", "teacher.eval_samples=16",
        "teacher.warmup_steps=2", "teacher.log_every=1", "teacher.checkpoint_every=2", "teacher.curriculum=[2,3]"]


def _run(tmp_path, *overrides, extra=()):
    args = ["--config", str(RECIPE), "--no-progress", *extra]
    for item in [*TINY, f"out_dir={tmp_path / 'teacher'}", *overrides]:
        args += ["--override", item]
    return teacher_cli.main(args)


def test_the_recipe_is_the_12_layer_proxy_teacher():
    recipe = load_recipe(RECIPE, [], cls=teacher_cli.TeacherRecipe)
    validate_teacher(recipe.teacher)
    t = recipe.teacher
    assert (t.num_layers, t.hidden_size, t.curriculum[-1], t.device) == (12, 256, 16, "auto")
    assert recipe.out_dir.endswith("proxy_teacher/teacher")
    selection = (ROOT / "recipes" / "experiments" / "selection.yaml").read_text()
    assert f"teacher_dir: {recipe.out_dir}" in selection  # the experiment reads the teacher this recipe writes


def test_a_complete_tiny_teacher_exits_0_with_its_report(tmp_path):
    assert _run(tmp_path, "teacher.advance_accuracy=0.01", "teacher.max_steps_per_stage=20") == 0
    report = json.loads((tmp_path / "teacher" / "teacher_report.json").read_text())
    assert report["curriculum_complete"] is True and [s["num_pairs"] for s in report["stages"]] == [2, 3]
    assert (tmp_path / "teacher" / "config.json").is_file() and (tmp_path / "teacher" / "log.txt").is_file()
    assert report["teacher"] == {**report["teacher"], "num_layers": 2, "device": "cpu"}


def test_a_stalled_curriculum_exits_3_and_keeps_the_teacher(tmp_path, capsys):
    assert _run(tmp_path, "teacher.advance_accuracy=1.0", "teacher.max_steps_per_stage=3") == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "never finished its curriculum" in errors[0]
    assert json.loads((tmp_path / "teacher" / "teacher_report.json").read_text())["curriculum_complete"] is False


def test_max_minutes_stops_with_75_and_the_same_command_continues(tmp_path, monkeypatch):
    from flashmorph.training import preemption

    clock = iter(range(0, 10**6, 1))  # every clock read advances 1 s: a 0.05-minute budget ends after a few steps
    monkeypatch.setattr(preemption.time, "monotonic", lambda: float(next(clock)))
    steps = ["teacher.advance_accuracy=1.0", "teacher.max_steps_per_stage=6", "teacher.require_complete=false"]
    assert _run(tmp_path, *steps, extra=["--max-minutes", "0.05"]) == 75
    checkpoints = sorted((tmp_path / "teacher" / "checkpoints").iterdir())
    assert checkpoints and not (tmp_path / "teacher" / "teacher_report.json").exists()
    monkeypatch.undo()
    assert _run(tmp_path, *steps) == 0
    report = json.loads((tmp_path / "teacher" / "teacher_report.json").read_text())
    assert report["train_steps"] == 12 and not (tmp_path / "teacher" / "checkpoints").exists()
    assert f"teacher: resuming from {checkpoints[-1]}" in (tmp_path / "teacher" / "log.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["--max-minutes", "0"], "--max-minutes=0.0 must be > 0"),
    (["--override", "teacher.device=tpu"], "teacher.device='tpu' is unknown"),
    (["--override", "out_dir="], "out_dir must name the directory"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # the recipe's relative out_dir would land here
    code = teacher_cli.main(["--config", str(RECIPE), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_the_experiment_trains_the_same_teacher_when_it_has_no_teacher_dir():
    from flashmorph.experiments.config import load_experiment

    experiment = load_experiment(ROOT / "recipes" / "experiments" / "selection.yaml")
    assert experiment.teacher == load_recipe(RECIPE, [], cls=teacher_cli.TeacherRecipe).teacher
