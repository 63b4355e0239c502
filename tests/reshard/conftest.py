"""Reshard fixtures: tiny HF model directories, and one ZeRO-3 (DP=2) -> HF -> TP=2 -> HF -> ZeRO-3 (DP=1) chain per
family, built once per session because every ZeRO-3 write spawns gloo processes."""

import pytest
import torch
from helpers.multiproc import run_distributed
from reshard_helpers import reshard_in_world, save_tiny

from flashmorph.checkpoint.reshard import reshard

FAMILIES = {"llama": torch.float32, "qwen3": torch.bfloat16}  # qwen3: per-head q/k norms, bf16 weights


@pytest.fixture(scope="session", params=list(FAMILIES))
def chain(request, tmp_path_factory):
    """{"family", "reference", "orig", stage dirs...}: the pipeline's directions, run once per family.

    llama: ZeRO-3 DP=2 -> HF (sharded) -> TP=2 -> HF -> ZeRO-3 DP=1 -> HF; qwen3 stops at the second HF (its
    q/k norms matter to TP; the DP=1 leg would only add another process start). llama's DP=2 checkpoint is written
    by the ranks of a launched world, qwen3's by the 2 processes reshard spawns itself.
    """
    family = request.param
    root = tmp_path_factory.mktemp(f"chain_{family}")
    out = {"family": family, "reference": save_tiny(root / "orig", family, FAMILIES[family]), "orig": root / "orig"}
    steps = [("hf", "zero3", "orig", "zero3_dp2", {"dp": 2}),  # the starting checkpoint
             ("zero3", "hf", "zero3_dp2", "hf_a", {"max_shard_size": "100KB"}),
             ("hf", "tp", "hf_a", "tp2", {"tp": 2}),
             ("tp", "hf", "tp2", "hf_b", {})]
    if family == "llama":
        steps += [("hf", "zero3", "hf_b", "zero3_dp1", {"dp": 1}), ("zero3", "hf", "zero3_dp1", "hf_c", {})]
    for src_format, dst_format, src, dst, options in steps:
        out[dst] = root / dst
        if family == "llama" and dst == "zero3_dp2":
            run_distributed(reshard_in_world, 2, src_format, dst_format, str(out[src]), str(out[dst]))
            continue
        reshard(src_format, dst_format, out[src], out[dst], show_progress=False, **options)
    return out
