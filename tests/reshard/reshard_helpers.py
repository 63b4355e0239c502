"""Helpers shared by the reshard tests: save a tiny HF model, read a HF directory back, compare bit for bit."""

import glob
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashmorph.checkpoint.reshard import reshard
from flashmorph.model.tiny import build_tiny_model, tiny_config


def save_tiny(path: Path, family: str = "llama", dtype: torch.dtype = torch.float32, **shape) -> dict:
    """Save a seeded tiny model as a HF directory; returns its state dict (the bit-exact reference)."""
    model = build_tiny_model(tiny_config(family, num_layers=2, **shape), dtype=dtype)
    model.save_pretrained(path)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def load_hf_dir(path: Path) -> dict:
    tensors = {}
    for file in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def assert_bit_exact(got: dict, reference: dict) -> None:
    assert set(got) == set(reference)
    for name, tensor in reference.items():
        same_bytes = torch.equal(got[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8))
        assert got[name].dtype == tensor.dtype and same_bytes, name


def reshard_in_world(info, src_format: str, dst_format: str, src: str, dst: str) -> str:
    """Run on every rank of a gloo world (as under `deepspeed --num_gpus N tools/reshard.py`)."""
    return str(reshard(src_format, dst_format, src, dst, show_progress=False))
