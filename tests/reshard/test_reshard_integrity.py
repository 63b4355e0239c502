"""A truncated or corrupted shard (HF, TP or ZeRO-3) fails with a one-line CheckpointError that names the file."""

import shutil

import pytest
from reshard_helpers import save_tiny

from flashmorph.checkpoint import MANIFEST_NAME
from flashmorph.checkpoint.reshard import TPSource, Zero3Source, reshard
from flashmorph.checkpoint.reshard.adapter import hf_weights
from flashmorph.errors import CheckpointError
from flashmorph.model.tiny import tiny_config


def truncate(path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))


def raises_naming(file_name: str, *match: str):
    pattern = ".*".join((*match, file_name.replace(".", r"\.")))
    return pytest.raises(CheckpointError, match=pattern)


@pytest.fixture
def tp_dir(tmp_path):
    save_tiny(tmp_path / "hf", "llama")
    reshard("hf", "tp", tmp_path / "hf", tmp_path / "tp", tp=2, show_progress=False)
    return tmp_path / "tp"


def test_truncated_hf_shard_without_manifest(tmp_path):
    save_tiny(tmp_path / "hf", "llama")  # as transformers wrote it: no manifest, only the header can tell
    truncate(tmp_path / "hf" / "model.safetensors")
    with raises_naming("model.safetensors", "truncated") as info:
        reshard("hf", "tp", tmp_path / "hf", tmp_path / "out", tp=2, show_progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_corrupted_hf_shard_with_manifest(tmp_path, tp_dir):
    reshard("tp", "hf", tp_dir, tmp_path / "hf2", max_shard_size="100KB", show_progress=False)
    flip_last_byte(tmp_path / "hf2" / "model-00002-of-00007.safetensors")
    with raises_naming("model-00002-of-00007.safetensors", "corrupted", "sha256") as info:
        reshard("hf", "tp", tmp_path / "hf2", tmp_path / "out", tp=2, show_progress=False)
    assert "\n" not in str(info.value)


def test_truncated_and_corrupted_tp_shards(tmp_path, tp_dir):
    damaged = tmp_path / "damaged"
    shutil.copytree(tp_dir, damaged)
    truncate(damaged / "tp_rank_01_of_02.safetensors")
    with raises_naming("tp_rank_01_of_02.safetensors", "truncated"):
        reshard("tp", "hf", damaged, tmp_path / "out", show_progress=False)
    (damaged / MANIFEST_NAME).unlink()  # even without the manifest the reader itself names the file
    with raises_naming("tp_rank_01_of_02.safetensors", "truncated"):
        TPSource(damaged)
    shutil.rmtree(damaged)
    shutil.copytree(tp_dir, damaged)
    flip_last_byte(damaged / "tp_rank_00_of_02.safetensors")
    with raises_naming("tp_rank_00_of_02.safetensors", "corrupted"):
        reshard("tp", "hf", damaged, tmp_path / "out", show_progress=False)


def test_truncated_zero3_rank_file(tmp_path, chain):
    damaged = tmp_path / "zero3"
    shutil.copytree(chain["zero3_dp2"], damaged)
    victim = next((damaged / "state").glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))  # bf16_ prefix for bf16
    truncate(victim)
    with raises_naming(victim.name, "corrupted checkpoint") as info:
        reshard("zero3", "hf", damaged, tmp_path / "out", show_progress=False)
    assert "truncated?" in str(info.value) and "\n" not in str(info.value)
    (damaged / MANIFEST_NAME).unlink()  # a checkpoint from elsewhere: opening the rank files still names it
    expected, aliases = hf_weights(tiny_config(chain["family"], num_layers=2))
    with raises_naming(victim.name, "truncated DeepSpeed file"):
        Zero3Source(damaged, expected, aliases)
