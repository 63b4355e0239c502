"""Which checkpoint a resume uses: a fallback past a damaged one is logged and recorded in summary.json;
--resume-from STEP picks a step and refuses, in one line and touching nothing, one that is missing or damaged."""

import json
import shutil

import pytest

from flashmorph.checkpoint import atomic
from helpers.gate_search_cli import gate_search_cli

MODEL_STATES = "state/zero_pp_rank_0_mp_rank_00_model_states.pt"


def _copy_run(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run / "run", run_dir)
    return run_dir


def _flip_bytes(path):
    """Same size, different content: only the sha256 in the manifest can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _checkpoint_files(run_dir):
    return {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}


def test_a_fallback_past_a_damaged_checkpoint_is_logged_and_recorded_in_the_summary(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    _flip_bytes(run_dir / "checkpoints" / "step_2" / MODEL_STATES)
    done = gate_search_cli(finished_run / "model", run_dir, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "summary.json").read_text())["resumed"]
    assert resumed["step"] == 1 and resumed["checkpoint"] == "step_1" and resumed["chosen_by"] == "newest intact"
    [damaged] = resumed["damaged_skipped"]
    assert damaged["step"] == 2 and damaged["file"] == MODEL_STATES and "sha256" in damaged["problem"]
    log = (run_dir / "log.txt").read_text()
    assert "resuming from step 1" in log and f"damaged and skipped: step 2 ({MODEL_STATES})" in log
    atomic.verify(run_dir / "checkpoints" / "step_2")  # step 2 was run again and re-saved intact


def test_resume_from_picks_an_older_step_and_records_it(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    done = gate_search_cli(finished_run / "model", run_dir, "--resume-from", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "summary.json").read_text())["resumed"]
    assert resumed == {"step": 1, "checkpoint": "step_1", "chosen_by": "--resume-from", "damaged_skipped": []}


@pytest.mark.parametrize("damage, step, expected", [
    ("none", "5", "--resume-from 5: "),  # no such step: refused before torch is imported
    ("flip", "2", "--resume-from 2: corrupted checkpoint"),  # same size: found by the hash check on resume
    ("truncate", "2", "--resume-from 2: corrupted checkpoint"),  # found by the size check before any work
    ("none", "-1", "argument --resume-from"),
    ("none", "two", "argument --resume-from"),
])
def test_resume_from_refuses_a_missing_or_damaged_step_and_touches_no_checkpoint(finished_run, tmp_path, damage,
                                                                                  step, expected):
    run_dir = _copy_run(finished_run, tmp_path)
    target = run_dir / "checkpoints" / "step_2" / MODEL_STATES
    if damage == "flip":
        _flip_bytes(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    before = _checkpoint_files(run_dir)
    done = gate_search_cli(finished_run / "model", run_dir, "--resume-from", step)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "error: " in last and expected in last, last  # argparse prefixes the program name
    assert "Traceback" not in done.stderr
    if damage != "none":
        assert MODEL_STATES in last and "step_2" in last
    assert _checkpoint_files(run_dir) == before
