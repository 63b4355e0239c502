"""A generated sbatch script run for real under a fake SLURM (srun/scontrol shims, real torchrun, 2 gloo ranks of
gate search on a tiny model): it trains and finishes; stopped mid-run by SIGTERM it leaves a complete checkpoint,
and the requeued job resumes to exactly the gates of the uninterrupted run."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from flashmorph.checkpoint.atomic import checkpoint_step, list_checkpoints, verify
from flashmorph.cli import make_slurm
from flashmorph.io.atomic import load_safetensors_verified
from flashmorph.model.tiny import build_tiny_model, tiny_config
from slurm_helpers import fake_slurm_env

STEPS = 60
SAVE_EVERY = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model(tiny_config("llama", num_layers=2), seed=7).save_pretrained(path)
    return path


def _job(tmp_path: Path, model_dir: Path, run_dir: Path, nodes: int, gpus_per_node: int) -> Path:
    args = ["--config", "recipes/embedded.yaml", "--stage", "gate_search", "--nodes", str(nodes),
            "--gpus-per-node", str(gpus_per_node), "--cpus-per-task", str(gpus_per_node), "--time", "00:30:00",
            "--run-dir", str(run_dir), "--log-dir", str(tmp_path)]
    for item in (f"model.path={model_dir}", f"search.steps={STEPS}", f"search.save_every={SAVE_EVERY}",
                 "search.micro_batch_size=2", "search.budget=1", "search.lr=0.1", "data.seq_len=64",
                 "data.num_pairs=4"):
        args += ["--override", item]
    script = tmp_path / f"job_{nodes}x{gpus_per_node}.sbatch"
    script.write_text(make_slurm.render(args))
    return script


def _run(script: Path, tmp_path: Path, nodes: int, restart_count: int = 0, stop_after: Path | None = None):
    """Run the batch script like sbatch would; with `stop_after`, SIGTERM it once that checkpoint exists."""
    env = fake_slurm_env(tmp_path, nodes=nodes, restart_count=restart_count)
    log = tmp_path / f"{script.stem}-{restart_count}-{time.monotonic_ns()}.out"  # like sbatch's per-job log
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        if stop_after is not None:
            deadline = time.time() + 180
            while not stop_after.is_dir() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job: batch shell, srun shim, torchruns, ranks
            proc.wait()
            pytest.fail(f"the job hung; its output:\n{log.read_text()[-6000:]}")
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    rc, out = _run(_job(tmp, model_dir, run_dir, nodes=2, gpus_per_node=1), tmp, nodes=2)
    return rc, out, run_dir


def test_two_nodes_train_and_finish(reference):
    rc, out, run_dir = reference
    assert rc == 0, out[-4000:]
    assert "2 ranks" in out and "job step exited with code 0" in out
    gates = load_safetensors_verified(run_dir / "gates.safetensors")["gate_values"]
    assert not torch.allclose(gates, torch.full_like(gates, 0.88), atol=1e-3), "gates did not move"
    assert checkpoint_step(list_checkpoints(run_dir / "checkpoints")[-1]) == STEPS
    assert (run_dir / "run.lock").is_file() and (run_dir / "config.yaml").is_file()


def test_sigterm_mid_run_leaves_a_checkpoint_and_the_requeued_job_resumes_exactly(reference, model_dir, tmp_path):
    ref_rc, ref_out, ref_dir = reference
    assert ref_rc == 0, ref_out[-4000:]
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    # one node of 2 GPUs this time: the same 2 ranks, so the same numbers as the 2-node reference
    script = _job(tmp_path, model_dir, run_dir, nodes=1, gpus_per_node=2)
    rc, out = _run(script, tmp_path, nodes=1, stop_after=root / f"step_{SAVE_EVERY}")
    assert rc != 0, out[-4000:]
    assert "preempted: stopped at step" in out, out[-4000:]
    assert not (run_dir / "gates.safetensors").exists(), "the run finished before the signal arrived"
    assert not (tmp_path / "scontrol.log").exists()  # TERM means preemption or scancel: SLURM decides on requeue
    latest = list_checkpoints(root)[-1]
    stopped_at = checkpoint_step(latest)
    assert SAVE_EVERY <= stopped_at < STEPS
    verify(latest, deep=True)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())

    rc, out = _run(script, tmp_path, nodes=1, restart_count=1)  # what SLURM's requeue starts
    assert rc == 0, out[-4000:]
    assert f"resumed from {latest} (step {stopped_at})" in out
    expected = load_safetensors_verified(ref_dir / "gates.safetensors")["gate_values"]
    got = load_safetensors_verified(run_dir / "gates.safetensors")["gate_values"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
