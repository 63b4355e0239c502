"""Atomic checkpoint directories: finalize/verify/latest_complete/prune and atomic single-file writes."""

import json
import logging
import os

import pytest
import torch

from flashmorph.checkpoint import atomic
from flashmorph.checkpoint.atomic import (
    checkpoint_step,
    finalize,
    latest_complete,
    list_checkpoints,
    prepare_staging,
    prune,
    read_manifest,
    staging_dir,
    verify,
)
from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.io.atomic import atomic_save_safetensors, atomic_write_bytes, atomic_write_text, load_safetensors_verified


def save_step(root, step, files=None, meta=None):
    """Simulate a multi-rank save: per-rank files in a nested tag dir, then finalize."""
    staging = prepare_staging(root, step)
    files = files or {
        "ds/mp_rank_00_model_states.pt": b"model" * 100,
        "ds/zero_pp_rank_0_optim_states.pt": os.urandom(3000),
        "ds/zero_pp_rank_1_optim_states.pt": os.urandom(3000),
        "latest": b"ds",
    }
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return finalize(root, step, meta if meta is not None else {"tokens_seen": 123 * step})


def flip_byte(path, offset=10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_finalize_writes_manifest_and_renames(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = save_step(root, 5)
    assert ckpt == root / "step_5" and ckpt.is_dir()
    assert not staging_dir(root, 5).exists()
    manifest = read_manifest(ckpt)
    assert manifest["step"] == 5 and manifest["meta"] == {"tokens_seen": 615}
    assert "flashmorph_version" in manifest
    listed = {e["path"]: e for e in manifest["files"]}
    assert set(listed) == {
        "ds/mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_0_optim_states.pt",
        "ds/zero_pp_rank_1_optim_states.pt",
        "latest",
    }
    assert listed["latest"]["size"] == 2
    assert verify(ckpt)["step"] == 5
    assert checkpoint_step(ckpt) == 5


def test_flipped_byte_is_corrupted_naming_the_file(tmp_path):
    ckpt = save_step(tmp_path, 1)
    flip_byte(ckpt / "ds" / "zero_pp_rank_1_optim_states.pt")
    verify(ckpt, deep=False)  # same size: only the hash can tell
    with pytest.raises(CheckpointError, match=r"corrupted.*ds/zero_pp_rank_1_optim_states\.pt") as info:
        verify(ckpt)
    assert "\n" not in str(info.value)


def test_truncated_file_fails_shallow_verify(tmp_path):
    ckpt = save_step(tmp_path, 1)
    path = ckpt / "ds" / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt is 493 bytes, manifest says 500"):
        verify(ckpt, deep=False)


def test_missing_listed_file(tmp_path):
    ckpt = save_step(tmp_path, 1)
    (ckpt / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"latest is missing"):
        verify(ckpt, deep=False)


def test_missing_manifest_is_incomplete(tmp_path):
    ckpt = save_step(tmp_path, 1)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*step_1 \(no manifest\.json\); delete it"):
        verify(ckpt)


def test_garbled_manifest_is_incomplete(tmp_path):
    ckpt = save_step(tmp_path, 1)
    (ckpt / "manifest.json").write_text('{"files": [')
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*unreadable"):
        verify(ckpt)


def test_manifest_path_escaping_the_checkpoint_is_rejected(tmp_path):
    ckpt = save_step(tmp_path, 1)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../outside"
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"escapes"):
        verify(ckpt, deep=False)


def test_extra_files_reported_unless_allowed(tmp_path):
    ckpt = save_step(tmp_path, 1)
    (ckpt / "ds" / "notes.txt").write_text("added later")
    with pytest.raises(CheckpointError, match=r"holds ds/notes\.txt, which manifest\.json does not list"):
        verify(ckpt)
    verify(ckpt, allow_extra=["ds/*.txt"])


def test_stale_staging_is_ignored_and_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    save_step(root, 1)
    crashed = prepare_staging(root, 2)  # simulated crash: files written, never finalized
    (crashed / "half_written.pt").write_bytes(b"x" * 10)
    assert list_checkpoints(root) == [root / "step_1"]
    assert latest_complete(root) == root / "step_1"

    staging = prepare_staging(root, 2)  # the next attempt at step 2 starts clean
    assert staging == crashed and list(staging.iterdir()) == []
    save_step(root, 2)
    assert latest_complete(root) == root / "step_2"
    assert verify(root / "step_2")  # no half_written.pt leaked in


def test_latest_complete_skips_corrupted_newer(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (10, 2, 30):
        save_step(root, step)
    assert [checkpoint_step(p) for p in list_checkpoints(root)] == [2, 10, 30]  # numeric, not lexical
    assert latest_complete(root) == root / "step_30"

    (root / "step_30" / "manifest.json").unlink()
    latest = root / "step_10" / "latest"
    latest.write_bytes(b"truncated-and-longer")
    with caplog.at_level(logging.WARNING, logger="flashmorph.checkpoint.atomic"):
        assert latest_complete(root) == root / "step_2"
    assert "step_30" in caplog.text and "step_10" in caplog.text
    assert (root / "step_30").is_dir() and (root / "step_10").is_dir()  # nothing deleted


def test_latest_complete_empty_or_missing_root(tmp_path):
    assert latest_complete(tmp_path / "nope") is None
    assert latest_complete(tmp_path) is None


def test_finalize_replaces_existing_step(tmp_path):
    root = tmp_path / "checkpoints"
    save_step(root, 3, files={"a.bin": b"old", "old_only.bin": b"1"})
    ckpt = save_step(root, 3, files={"a.bin": b"new!"})
    assert (ckpt / "a.bin").read_bytes() == b"new!"
    assert not (ckpt / "old_only.bin").exists()
    verify(ckpt)
    assert sorted(p.name for p in root.iterdir()) == ["step_3"]  # nothing left aside


def test_finalize_requires_staging_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="call prepare_staging"):
        finalize(tmp_path, 1, {})
    prepare_staging(tmp_path, 1)
    with pytest.raises(CheckpointError, match="is empty"):
        finalize(tmp_path, 1, {})


def test_prune_keeps_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_step(root, step)
    (root / "step_4" / "manifest.json").unlink()  # newest is broken: kept for inspection, not counted
    live = prepare_staging(root, 5)
    (live / "in_progress.pt").write_bytes(b"x")

    deleted = prune(root, keep_last=1)
    assert deleted == [root / "step_1", root / "step_2"]
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_5", "step_3", "step_4"]
    assert latest_complete(root) == root / "step_3"
    assert prune(root, keep_last=1) == []
    with pytest.raises(ConfigError, match="keep_last"):
        prune(root, keep_last=0)


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "sub" / "hybrid.json"
    atomic_write_text(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["hybrid.json"]  # no temp files left


def test_atomic_write_crash_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_text(path, "new: 2\n")
    assert path.read_text() == "old: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_atomic_save_safetensors_crash_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "gates.safetensors"
    atomic_save_safetensors({"gate_logits": torch.ones(4)}, path, metadata={"layout": "per_layer"})
    monkeypatch.setattr(atomic.os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        atomic_save_safetensors({"gate_logits": torch.zeros(4)}, path)
    monkeypatch.undo()
    tensors, metadata = load_safetensors_verified(path, with_metadata=True)
    assert torch.equal(tensors["gate_logits"], torch.ones(4))
    assert metadata == {"layout": "per_layer"}


def test_atomic_save_safetensors_is_byte_stable(tmp_path):
    """safetensors keeps metadata in a hash map whose order changes between saves; ours sorts it, so equal tensors
    and metadata give equal files, which still load with the same tensors and metadata."""
    tensors = {"gate_values": torch.rand(4, generator=torch.Generator().manual_seed(0)),
               "layer_scores": torch.arange(4, dtype=torch.float16)}
    metadata = {f"key_{i}": f"value {i} é" for i in (5, 3, 0, 4, 1, 2)}
    files = [tmp_path / f"gates_{i}.safetensors" for i in range(6)]
    for path in files:
        atomic_save_safetensors(tensors, path, metadata=metadata)
    assert len({path.read_bytes() for path in files}) == 1
    header = files[0].read_bytes()[8:8 + int.from_bytes(files[0].read_bytes()[:8], "little")]
    assert list(json.loads(header)["__metadata__"]) == sorted(metadata)
    loaded, loaded_metadata = load_safetensors_verified(files[0], with_metadata=True)
    assert loaded_metadata == metadata
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_load_safetensors_verified_truncated(tmp_path):
    path = tmp_path / "gates.safetensors"
    atomic_save_safetensors({"gate_logits": torch.randn(32), "head_logits": torch.randn(4, 8)}, path)
    assert set(load_safetensors_verified(path)) == {"gate_logits", "head_logits"}
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match=r"corrupted or truncated safetensors file .*gates\.safetensors") as info:
        load_safetensors_verified(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x05", b"\xff" * 64])
def test_load_safetensors_verified_garbage(tmp_path, content):
    path = tmp_path / "gates.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_safetensors_verified(path)


def test_load_safetensors_verified_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safetensors_verified(tmp_path / "gates.safetensors")


def test_atomic_write_file_mode(tmp_path):
    path = tmp_path / "gates.safetensors"
    atomic_save_safetensors({"gate_logits": torch.ones(2)}, path)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    path.chmod(0o640)
    atomic_write_bytes(path, b"x")
    assert path.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
