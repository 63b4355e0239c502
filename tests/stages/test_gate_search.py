"""Gate search under the real DeepSpeed ZeRO-3 engine on CPU: 2 gloo ranks (DP, TP or Ulysses SP) = 1 process;
kill + resume = uninterrupted."""

import json
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


def _search(info, overrides, resume=False):
    from flashmorph.stages.gate_search import run_gate_search

    recipe = load_recipe(RECIPE, overrides)
    result = run_gate_search(recipe, info, resume=resume, show_progress=False)
    return result.gate_values, result.final_accuracy


ACCUM = ["search.grad_accum_steps=2"]
TP2, SP2 = ["parallel.tensor_parallel=2"], ["parallel.sequence_parallel=2"]


def _search_two_ranks(info, model_dir, root):
    """One 2-rank world (its start-up is the cost), several runs: data parallel (micro batch 2 per rank), TP=2 and
    SP=2 (one replica, micro batch 4), and TP=2 stopped after 2 steps then resumed to 4."""
    runs = {"dp2": _search(info, _overrides(model_dir, root / "dp2", 2, extra=ACCUM)),
            "tp2": _search(info, _overrides(model_dir, root / "tp2", 4, extra=[*ACCUM, *TP2])),
            "sp2": _search(info, _overrides(model_dir, root / "sp2", 4, extra=[*ACCUM, *SP2]))}
    _search(info, _overrides(model_dir, root / "tp2_resumed", 4, steps=2, extra=[*ACCUM, *TP2]))
    runs["tp2_resumed"] = _search(info, _overrides(model_dir, root / "tp2_resumed", 4, extra=[*ACCUM, *TP2]),
                                  resume=True)
    return runs


def test_two_ranks_in_every_layout_match_one_process(model_dir, tmp_path):
    # one process with micro batch 4 sees exactly the samples that 2 DP ranks with micro batch 2 see, and that
    # one TP or SP pair with micro batch 4 sees (each SP rank half of every sequence)
    single = run_distributed(_search, 1, _overrides(model_dir, tmp_path / "one", 4, extra=ACCUM))
    double = run_distributed(_search_two_ranks, 2, model_dir, tmp_path)
    gates_1, acc_1 = single[0]
    assert not torch.allclose(gates_1, torch.full_like(gates_1, 0.88), atol=1e-3), "gates did not move"
    for name in ("dp2", "tp2", "sp2", "tp2_resumed"):
        (gates_a, acc_a), (gates_b, acc_b) = double[0][name], double[1][name]
        torch.testing.assert_close(gates_a, gates_b, rtol=0, atol=0, msg=f"{name}: ranks disagree")
        assert acc_a == acc_b, name
        # summation order differs between 1 and 2 ranks, so equality holds to fp32 rounding
        torch.testing.assert_close(gates_a, gates_1, rtol=0, atol=1e-5, msg=f"{name}: gates differ from 1 process")
        assert acc_a == pytest.approx(acc_1, abs=1e-6), name
    # the resumed TP run replays the uninterrupted one exactly
    torch.testing.assert_close(double[0]["tp2_resumed"][0], double[0]["tp2"][0], rtol=0, atol=0)
    resumed = json.loads((tmp_path / "tp2_resumed" / "summary.json").read_text())["resumed"]
    assert resumed and resumed["step"] == 2, resumed
    for name in ("tp2", "sp2"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["samples_per_step"] == 8, "one data-parallel replica: micro batch 4 x 2 accumulation steps"
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
