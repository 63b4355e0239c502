"""The generated sbatch script's own logic under a fake SLURM, with a fake torchrun: the rendezvous it derives per
node, --resume on a requeued job, and what it does with USR1 (forward, requeue) and TERM (forward, no requeue)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flashmorph.cli import make_slurm
from slurm_helpers import fake_slurm_env

# records its node's arguments, then runs FAKE_TORCHRUN_SECONDS; USR1 ends it like a rank that checkpointed and
# stopped (exit 75, or FAKE_USR1_EXIT); TERM kills it (143), which is what would lose the step
FAKE_TORCHRUN = r"""#!/bin/bash
out=$FAKE_OUT/node$SLURM_NODEID
printf '%s\n' "$@" > "$out.args"
printf '%s\n' "PYTHONPATH=$PYTHONPATH" "PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE" > "$out.env"
trap 'echo USR1 >> "$out.signals"; exit ${FAKE_USR1_EXIT:-75}' USR1
trap 'echo TERM >> "$out.signals"; exit 143' TERM
touch "$out.started"
for ((i = 0; i < FAKE_TORCHRUN_SECONDS * 10; i++)); do sleep 0.1; done
"""


def _script(tmp_path: Path) -> Path:
    text = make_slurm.render(["--config", "recipes/llama3_8b_gate_search.yaml", "--nodes", "2", "--gpus-per-node", "4",
                              "--time", "01:00:00", "--run-dir", str(tmp_path / "run"), "--log-dir", str(tmp_path),
                              "--override", "search.steps=10"])
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    return path


def _start(tmp_path: Path, seconds: int, restart_count: int = 0, **extra):
    env = fake_slurm_env(tmp_path, nodes=2, restart_count=restart_count)
    (tmp_path / "fake_slurm_bin" / "torchrun").write_text(FAKE_TORCHRUN)
    (tmp_path / "fake_slurm_bin" / "torchrun").chmod(0o755)
    env.update(FAKE_OUT=str(tmp_path), FAKE_TORCHRUN_SECONDS=str(seconds), **extra)
    proc = subprocess.Popen(["bash", str(_script(tmp_path))], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _started.append(proc)
    return proc, env


_started = []


@pytest.fixture(autouse=True)
def _no_leftover_jobs():
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:  # a failed test: take the batch shell, srun shim and fake torchruns down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_started(tmp_path: Path, proc) -> None:
    deadline = time.time() + 30
    while not all((tmp_path / f"node{n}.started").exists() for n in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_generated_script_is_valid_bash(tmp_path):
    subprocess.run(["bash", "-n", str(_script(tmp_path))], check=True)


def test_one_torchrun_per_node_with_slurm_derived_rendezvous(tmp_path):
    proc, env = _start(tmp_path, seconds=0)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for node in (0, 1):
        args = _lines(tmp_path / f"node{node}.args")
        assert args[:5] == ["--nnodes=2", "--nproc_per_node=4", f"--node_rank={node}", "--master_addr=127.0.0.1",
                            f"--master_port={env['MASTER_PORT']}"]
        assert args[5:] == ["launcher/gate_search.py", "--config", "recipes/llama3_8b_gate_search.yaml",
                            "--override", f"run.run_dir={tmp_path / 'run'}", "--override", "search.steps=10",
                            "--no-progress"]
        recorded = _lines(tmp_path / f"node{node}.env")
        assert f"PYTHONPATH={make_slurm.ROOT}" in recorded[0]  # the checkout, so launcher/ imports flashmorph
        assert "SIGUSR1" in recorded[1]  # torchrun forwards the early-warning signal to its ranks
    assert "8 ranks" in out
    assert not (tmp_path / "scontrol.log").exists()


@pytest.mark.parametrize("how", [{"restart_count": 1}, {"FLASHMORPH_RESUME": "1"}])
def test_requeued_or_resubmitted_job_resumes(tmp_path, how):
    proc, _ = _start(tmp_path, seconds=0, **how)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert _lines(tmp_path / "node0.args")[-1] == "--resume"


def test_usr1_is_forwarded_to_every_node_and_the_job_requeues(tmp_path):
    proc, _ = _start(tmp_path, seconds=60)
    _wait_started(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@secs` delivers to the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    for node in (0, 1):
        assert _lines(tmp_path / f"node{node}.signals") == ["USR1"]
    assert _lines(tmp_path / "scontrol.log") == ["requeue 4242"]


def test_term_reaches_the_ranks_as_usr1_and_does_not_requeue(tmp_path):
    proc, _ = _start(tmp_path, seconds=60)
    _wait_started(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)  # scancel / preemption: SLURM requeues by itself if it means to
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    for node in (0, 1):
        assert _lines(tmp_path / f"node{node}.signals") == ["USR1"]  # a TERM to srun would have become SIGKILL
    assert not (tmp_path / "scontrol.log").exists()


def test_a_run_that_finishes_as_usr1_arrives_is_not_requeued(tmp_path):
    proc, _ = _start(tmp_path, seconds=60, FAKE_USR1_EXIT="0")  # the last step ends as the warning comes
    _wait_started(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert not (tmp_path / "scontrol.log").exists()
