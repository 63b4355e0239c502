"""Every FLASHMORPH_FAULT_KILL_AT site is reached and kills the process there; what each kill leaves is resumable,
and once the run saves again the checkpoint root holds the same checkpoints, and nothing else, as without the kill."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flashmorph.checkpoint.atomic import latest_complete, list_checkpoints, verify
from flashmorph.io.atomic import FAULT_SITES, _parse_fault, atomic_write_text
from save_step import save

SAVER = Path(__file__).with_name("save_step.py")
ROOT = Path(__file__).resolve().parents[2]

# (site:n, step the killed process saves, newest complete checkpoint after the kill); steps 1 and 2 exist before
CASES = [
    ("file_tmp:1", 3, 2),  # the staging dir holds a temp file only
    ("file_renamed:2", 3, 2),  # both files in the staging dir, no manifest
    ("staging:1", 3, 2),
    ("sealing:1", 3, 2),
    ("manifest:1", 3, 2),  # .tmp-step_3 holds a full manifest, but only a rename makes it a checkpoint
    ("sealed:1", 3, 3),  # step_3 in place, step_1 not yet pruned
    ("prune:1", 3, 3),  # step_1 renamed to .del-step_1, not yet deleted
    ("replace:1", 2, 1),  # step_2 saved again: the old one moved aside, the new one not yet renamed in
]


def _kill_at(fault: str, root: Path, step: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLASHMORPH_FAULT_KILL_AT": fault,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SAVER), str(root), str(step)], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_cases_cover_every_site():
    assert sorted(c[0].split(":")[0] for c in CASES) == sorted(FAULT_SITES)


@pytest.mark.parametrize("fault, step, newest", CASES, ids=[c[0] for c in CASES])
def test_a_kill_at_each_site_leaves_a_resumable_root_that_the_next_saves_clean_up(tmp_path, fault, step, newest):
    root = tmp_path / "checkpoints"
    for done in (1, 2):
        save(root, done)
    killed = _kill_at(fault, root, step)
    assert killed.returncode == -signal.SIGKILL, f"{fault} was not reached: {killed.stderr[-2000:]}"
    assert latest_complete(root) == root / f"step_{newest}"
    for ckpt in list_checkpoints(root):
        verify(ckpt, deep=True)  # a kill never leaves a damaged step_N

    for again in range(newest + 1, 5):  # the resumed run saves every later step again, then step 4
        save(root, again)
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"], "leftovers of the killed save remain"
    for ckpt in list_checkpoints(root):
        assert (ckpt / "model.txt").read_text() == f"model at step {ckpt.name.split('_')[1]}"
        verify(ckpt, deep=True)


def test_an_unset_variable_is_off_and_a_bad_one_is_refused_by_name():
    assert _parse_fault(None) is None and _parse_fault("") is None
    assert _parse_fault("manifest:3") == ("manifest", 3)
    for bad in ("manifest", "manifest:0", "manifest:x", "nowhere:1"):
        with pytest.raises(ValueError, match="FLASHMORPH_FAULT_KILL_AT"):
            _parse_fault(bad)


def test_a_site_not_reached_n_times_does_not_kill(tmp_path):
    done = _kill_at("sealed:2", tmp_path, 1)  # one save passes `sealed` once
    assert done.returncode == 0, done.stderr[-2000:]
    verify(tmp_path / "step_1")


def test_a_single_file_write_killed_before_its_rename_leaves_the_old_file_and_the_next_write_removes_its_temp(
        tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    target.write_text("old")
    code = "import sys; from flashmorph.io.atomic import atomic_write_text; atomic_write_text(sys.argv[1], 'new')"
    env = {**os.environ, "FLASHMORPH_FAULT_KILL_AT": "file_tmp:1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 2  # the target and the killed temp
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "the killed write's temp file is left"
