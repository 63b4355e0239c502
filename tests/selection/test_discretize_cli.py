"""tools/discretize_gates.py end to end: a tiny gates file in, hybrid.json and the report out; bad input exits 2."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flashmorph.cli import discretize_gates
from flashmorph.io.atomic import atomic_save_safetensors
from flashmorph.model.tiny import build_tiny_model, tiny_config
from flashmorph.selection import HybridLayout

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "discretize_gates.py"
GATES = torch.tensor([0.77, 0.01, 0.80, 0.02])


def _write_gates(run_dir: Path, values: torch.Tensor, budget=None) -> Path:
    """A gates file as gate search writes it (and its config.yaml, when a budget is given)."""
    scores = values.mean(-1) if values.dim() == 2 else values
    metadata = {"granularity": "head" if values.dim() == 2 else "layer", "num_layers": str(values.shape[0]),
                "steps": "300", "model": "tiny"}
    path = atomic_save_safetensors({"gate_values": values, "layer_scores": scores.clone()},
                                   run_dir / "gates.safetensors", metadata=metadata)
    if budget is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"search": {"budget": budget}}))
    return path


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_gates_end_to_end(tmp_path):
    gates = _write_gates(tmp_path, GATES)
    out = tmp_path / "out" / "hybrid.json"
    done = _cli("--gates", gates, "--budget", "2", "--out", out, "--report")
    assert done.returncode == 0, done.stderr
    layout = HybridLayout.load(out, num_layers=4)
    assert layout.layer_types == ["full", "linear", "full", "linear"] and layout.method == "gates"
    assert layout.inputs["gates"] == str(gates) and layout.inputs["gate_search_steps"] == "300"
    report = (out.parent / "sensitivity.txt").read_text()
    assert "margin at the cut" in report and "k=2" in report
    has_png = (out.parent / "gates.png").is_file()
    assert has_png == (importlib.util.find_spec("matplotlib") is not None)
    assert "wrote" in done.stdout and (has_png or "matplotlib is not installed" in done.stderr)


def test_bad_budget_is_one_line_and_exit_2(tmp_path, capsys):
    gates = _write_gates(tmp_path, GATES)
    code = discretize_gates.main(["--gates", str(gates), "--budget", "9", "--out", str(tmp_path / "hybrid.json")])
    err = capsys.readouterr().err  # in-process: a subprocess (the path users run) is test_gates_end_to_end's
    assert code == 2
    assert err.startswith("error: --budget=9 exceeds the 4 layers") and err.count("\n") == 1
    assert not (tmp_path / "hybrid.json").exists()


def test_threshold_head_level_and_run_budget(tmp_path, capsys):
    _write_gates(tmp_path, GATES, budget=0.25)  # default budget: search.budget of the run's config.yaml
    gates = str(tmp_path / "gates.safetensors")
    assert discretize_gates.main(["--gates", gates, "--out", str(tmp_path / "a.json")]) == 0
    layout = HybridLayout.load(tmp_path / "a.json")
    assert layout.full_layers == [2] and "config.yaml" in layout.inputs["budget_source"]
    assert discretize_gates.main(["--gates", str(tmp_path / "gates.safetensors"), "--method", "threshold",
                                  "--threshold", "0.5", "--out", str(tmp_path / "b.json"), "--report",
                                  "--compare", str(tmp_path / "a.json")]) == 0
    assert HybridLayout.load(tmp_path / "b.json").full_layers == [0, 2]
    assert "gates: [2]" in (tmp_path / "sensitivity.txt").read_text()

    heads = tmp_path / "heads"
    heads.mkdir()
    _write_gates(heads, torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.4, 0.8]]))
    assert discretize_gates.main(["--gates", str(heads / "gates.safetensors"), "--level", "head",
                                  "--heads-per-layer", "1", "--out", str(heads / "hybrid.json")]) == 0
    assert HybridLayout.load(heads / "hybrid.json").full_heads == [[True, False], [False, True], [False, True]]


@pytest.fixture(scope="module")
def model_and_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    build_tiny_model(tiny_config("llama", num_layers=4), seed=3).save_pretrained(root / "model")
    recipe = {"model": {"path": str(root / "model"), "dtype": "float32"}, "search": {"budget": 2},
              "data": {"tasks": {"mqar": 1.0}, "seq_len": 64, "num_pairs": 4}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "model", root / "recipe.yaml"


@pytest.mark.parametrize("method", ["leave_one_out", "kl", "nll", "periodic", "random"])
def test_baselines_through_the_cli(tmp_path, model_and_recipe, method):
    model, recipe = model_and_recipe
    out = tmp_path / "hybrid.json"
    args = ["--method", method, "--model", str(model), "--out", str(out), "--num-batches", "1", "--batch-size", "2"]
    data_free = method in ("periodic", "random")
    args += ["--budget", "0.5"] if data_free else ["--recipe", str(recipe)]
    assert discretize_gates.main(args) == 0
    layout = HybridLayout.load(out, num_layers=4)
    assert layout.method == method and len(layout.full_layers) == 2
    assert layout.cost.forward_passes == (0 if data_free else 5)  # all-softmax + 4 one-layer-linear passes


@pytest.mark.parametrize("args, message", [
    (["--gates", "GATES", "--budget", "two"], "--budget='two' must be a count"),
    (["--gates", "GATES", "--budget", "1.5"], r"--budget=1.5 as a fraction must lie in \[0, 1\]"),
    (["--gates", "GATES"], "--budget is required"),
    (["--gates", "GATES", "--method", "threshold"], "--method threshold needs --threshold"),
    (["--gates", "GATES", "--method", "periodic", "--report"], "--report needs per-layer scores"),
    (["--gates", "GATES", "--heads-per-layer", "1"], "--heads-per-layer needs --method gates --level head"),
    (["--gates", "GATES", "--level", "head", "--budget", "2"], "needs per-head gates"),
    (["--gates", "GATES", "--budget", "2", "--recipe", "recipes/embedded.yaml"], "--recipe is for the baselines"),
    (["--method", "kl", "--budget", "2"], "--method kl needs --recipe"),
    (["--budget", "2"], "--method gates needs --gates"),
    (["--gates", "GATES", "--budget", "2", "--out", "EXISTING"], "already exists; pass --force"),
])
def test_bad_input(tmp_path, capsys, args, message):
    gates = _write_gates(tmp_path, GATES)
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    out = tmp_path / "hybrid.json"
    args = [str(gates) if a == "GATES" else str(existing) if a == "EXISTING" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    assert discretize_gates.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.exists() and existing.read_text() == "{}"


def test_hybrid_json_is_readable(tmp_path):
    out = tmp_path / "hybrid.json"
    gates = str(_write_gates(tmp_path, GATES))
    assert discretize_gates.main(["--gates", gates, "--budget", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["full_layers"] == [2] and len(out.read_text().splitlines()) == len(data) + 2  # one key per line


def test_compare_with_another_model_is_refused(tmp_path, capsys):
    other = tmp_path / "other.json"
    assert discretize_gates.main(["--gates", str(_write_gates(tmp_path, GATES)), "--budget", "1",
                                  "--out", str(other)]) == 0
    six = tmp_path / "six"
    six.mkdir()
    gates = _write_gates(six, torch.rand(6))
    assert discretize_gates.main(["--gates", str(gates), "--budget", "1", "--out", str(six / "h.json"),
                                  "--compare", str(other)]) == 2
    assert "describes 4 layers, this model has 6" in capsys.readouterr().err
    assert not (six / "h.json").exists()
