"""Gate search under the real DeepSpeed ZeRO-3 engine on CPU: 2 gloo ranks = 1 process; kill + resume = uninterrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashmorph.checkpoint.atomic import list_checkpoints
from flashmorph.config import load_recipe
from flashmorph.io.atomic import load_safetensors_verified
from flashmorph.model.tiny import build_tiny_model, tiny_config
from helpers.multiproc import run_distributed

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "embedded.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model(tiny_config("llama", num_layers=3), seed=7).save_pretrained(path)
    return path


def _overrides(model_dir, run_dir, micro_batch_size, steps=4, extra=()):
    return [f"model.path={model_dir}", f"run.run_dir={run_dir}", f"search.steps={steps}",
            f"search.micro_batch_size={micro_batch_size}", "search.budget=1", "search.save_every=0",
            "data.seq_len=64", "data.num_pairs=4", "search.lr=0.1", *extra]


def _search(info, overrides):
    from flashmorph.stages.gate_search import run_gate_search

    recipe = load_recipe(RECIPE, overrides)
    result = run_gate_search(recipe, info, show_progress=False)
    return result.gate_values, result.final_accuracy


def test_two_zero3_ranks_match_one_process(model_dir, tmp_path):
    # one process with micro batch 4 sees exactly the samples that 2 ranks with micro batch 2 see
    single = run_distributed(_search, 1, _overrides(model_dir, tmp_path / "one", 4, extra=["search.grad_accum_steps=2"]))
    double = run_distributed(_search, 2, _overrides(model_dir, tmp_path / "two", 2, extra=["search.grad_accum_steps=2"]))
    gates_1, acc_1 = single[0]
    gates_2a, acc_2 = double[0]
    gates_2b, _ = double[1]
    assert not torch.allclose(gates_1, torch.full_like(gates_1, 0.88), atol=1e-3), "gates did not move"
    torch.testing.assert_close(gates_2a, gates_2b, rtol=0, atol=0)  # ranks agree exactly
    # summation order differs between 1 and 2 ranks, so equality holds to fp32 rounding
    torch.testing.assert_close(gates_2a, gates_1, rtol=0, atol=1e-5)
    assert acc_1 == pytest.approx(acc_2, abs=1e-6)
    assert (tmp_path / "one" / "gates.safetensors").is_file()
    assert (tmp_path / "one" / "tb").is_dir() and any((tmp_path / "one" / "tb").iterdir())


def _twice_then_resume(info, model_dir, root):
    """Two identical runs, then --resume of the first one after it finished."""
    from flashmorph.stages.gate_search import run_gate_search

    for name in ("a", "b"):
        run_gate_search(load_recipe(RECIPE, _overrides(model_dir, root / name, 4, steps=3)), info, show_progress=False)
    events_before = sorted(p.name for p in (root / "a" / "tb").iterdir())
    run_gate_search(load_recipe(RECIPE, _overrides(model_dir, root / "a", 4, steps=3)), info, resume=True,
                    show_progress=False)
    return events_before, sorted(p.name for p in (root / "a" / "tb").iterdir())


def test_identical_runs_write_identical_gates_and_a_finished_resume_no_empty_event_file(model_dir, tmp_path):
    events_before, events_after = run_distributed(_twice_then_resume, 1, model_dir, tmp_path)[0]
    first, second = (tmp_path / name / "gates.safetensors" for name in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()
    assert len(events_before) == 1
    assert events_after == events_before, "resuming a finished run created a tensorboard event file with nothing in it"


def _launch(model_dir, run_dir, steps, resume=False):
    overrides = _overrides(model_dir, run_dir, 8, steps=steps, extra=["search.save_every=3", "data.seq_len=256",
                                                                        "search.keep_last=0"])
    cmd = [sys.executable, str(ROOT / "launcher" / "gate_search.py"), "--config", str(RECIPE), "--no-progress"]
    for item in overrides:
        cmd += ["--override", item]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_resume_reaches_the_uninterrupted_gates(model_dir, tmp_path):
    steps = 24
    reference = _launch(model_dir, tmp_path / "ref", steps)
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    victim = _launch(model_dir, tmp_path / "killed", steps)
    root = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(root):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "gates.safetensors").exists(), "the run finished before it was killed"
    killed_at = [int(p.name.split("_")[1]) for p in list_checkpoints(root)]
    assert killed_at and max(killed_at) < steps

    resumed = _launch(model_dir, tmp_path / "killed", steps, resume=True)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    expected = load_safetensors_verified(tmp_path / "ref" / "gates.safetensors")["gate_values"]
    got = load_safetensors_verified(tmp_path / "killed" / "gates.safetensors")["gate_values"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rerun_without_resume_refuses_to_clobber(model_dir, tmp_path):
    first = _launch(model_dir, tmp_path / "run", 3)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    second = _launch(model_dir, tmp_path / "run", 3)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 2
    assert "--resume" in out.strip().splitlines()[-1]
