"""One job per run directory: rank 0 holds run.lock (flock) for its lifetime; a second job stops at once, naming it."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashmorph.errors import FlashMorphError
from flashmorph.run_dir import LOCK_NAME, lock_run_dir, prepare_run_dir, release_run_dir_lock

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"run": {"run_dir": "x"}, "search": {"steps": 3}}
HOLDER = """
import sys, time
from flashmorph.run_dir import prepare_run_dir
prepare_run_dir(sys.argv[1], {}, resume=False)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another job (own process, SLURM job 777) that prepared tmp_path/run and still runs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLURM_JOB_ID="777")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.communicate(timeout=30)[0]
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_second_job_on_a_locked_run_dir_fails_at_once_naming_the_holder(holder, tmp_path):
    started = time.monotonic()
    with pytest.raises(FlashMorphError) as info:
        prepare_run_dir(tmp_path / "run", CONFIG, resume=True)
    assert time.monotonic() - started < 5  # no waiting for the lock
    message = str(info.value)
    assert "\n" not in message and "in use by another job" in message
    assert f"host {socket.gethostname()}" in message and f"pid {holder.pid}" in message and "SLURM job 777" in message
    assert "steps" not in (tmp_path / "run" / "config.yaml").read_text()  # the holder's config was not replaced


def test_the_lock_goes_with_its_holder_even_when_killed(holder, tmp_path):
    holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
    holder.wait(timeout=30)
    run_dir = prepare_run_dir(tmp_path / "run", CONFIG, resume=True)
    try:
        assert (run_dir / LOCK_NAME).is_file()
        assert f'"pid": {os.getpid()}' in (run_dir / LOCK_NAME).read_text()
    finally:
        release_run_dir_lock(run_dir)


def test_the_same_process_may_prepare_its_run_dir_again(tmp_path):
    run_dir = prepare_run_dir(tmp_path / "run", CONFIG, resume=False)
    try:
        assert prepare_run_dir(run_dir, CONFIG, resume=True) == run_dir  # e.g. a stage that calls it per phase
    finally:
        release_run_dir_lock(run_dir)


def test_released_lock_can_be_taken_by_another_process(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock_run_dir(run_dir)
    release_run_dir_lock(run_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys; from flashmorph.run_dir import lock_run_dir; lock_run_dir(sys.argv[1]); print('ok')"
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
