"""A full disk or an unwritable directory while writing checkpoints and run files: one clear CheckpointError, no
staging or temp file left behind, earlier checkpoints and files intact. (Multi-rank saves: test_deepspeed_launcher.)"""

import errno
import os

import pytest

from flashmorph.checkpoint import atomic
from flashmorph.errors import CheckpointError
from flashmorph.io import atomic as io_atomic


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_step(root, step, payload=b"weights" * 100):
    staging = atomic.prepare_staging(root, step)
    (staging / "state").mkdir()
    (staging / "state" / "rank0.pt").write_bytes(payload)
    return atomic.finalize(root, step, {"step": step})


def test_full_disk_while_sealing_removes_the_staging_dir_and_keeps_earlier_steps(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save_step(root, 1)
    staging = atomic.prepare_staging(root, 2)
    (staging / "rank0.pt").write_bytes(b"half of step 2")
    monkeypatch.setattr(atomic.json, "dump", _no_space)  # the manifest is the last file written before the rename
    with pytest.raises(CheckpointError) as info:
        atomic.finalize(root, 2, {"step": 2})
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "free there" in message
    assert "step_2 was not written; earlier checkpoints are intact" in message
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]
    atomic.verify(root / "step_1", deep=True)
    assert atomic.latest_complete(root) == root / "step_1"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_unwritable_checkpoints_dir_is_one_error(tmp_path, monkeypatch, code):
    root = tmp_path / "checkpoints"
    _save_step(root, 1)

    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(atomic.Path, "mkdir", refuse)
    with pytest.raises(CheckpointError) as info:
        atomic.prepare_staging(root, 2)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and os.strerror(code) in message and ".tmp-step_2" in message
    assert "point run.run_dir at another filesystem" in message
    atomic.verify(root / "step_1", deep=True)


def test_full_disk_on_an_atomic_file_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    io_atomic.atomic_write_text(path, "old")
    real_open = open

    def open_fails_for_temp(file, mode="r", *args, **kwargs):
        if "w" in mode and ".summary.json." in str(file):
            _no_space()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_fails_for_temp)
    with pytest.raises(CheckpointError, match=r"cannot write summary\.json .*No space left on device.*"
                                              r"the previous summary\.json, if any, is unchanged"):
        io_atomic.atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_other_os_errors_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):  # a failing disk is not a "free space" problem
        io_atomic.atomic_write_text(tmp_path / "x.json", "{}")


def test_torch_save_failure_without_errno_still_names_the_path_and_free_space(tmp_path):
    err = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed\nmore detail")
    message = str(io_atomic.storage_error(err, "checkpoint step 4 (rank 1)", tmp_path / ".tmp-step_4",
                                          "earlier checkpoints are intact"))
    assert message.startswith(f"cannot write checkpoint step 4 (rank 1) to {tmp_path / '.tmp-step_4'} (")
    assert "file write failed" in message and "free there" in message and "\n" not in message
    assert message.endswith("earlier checkpoints are intact")
