"""Gate search under tensor and Ulysses sequence parallelism: TP and SP applied to a MorphableLM, the TP all-reduce
of the gates' gradient, this rank's share of a batch, and the loss scale that makes ZeRO's average the step's mean."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from flashmorph.errors import FlashMorphError
from flashmorph.parallel.layout import check_gate_granularity
from flashmorph.parallel.mesh import Mesh
from flashmorph.parallel.sequence import install_sequence_parallel, shard_sequence
from flashmorph.parallel.tensor import apply_tensor_parallel, tensor_parallel_state


def parallelize_gate_search(model: nn.Module, mesh: Mesh, micro_batch_size: int) -> nn.Module:
    """Split a MorphableLM (built from unpartitioned weights, or around a model `load_sharded_causal_lm` already split
    over TP) over `mesh` in place: megatron TP on its projections and Ulysses SP around its attention; call before
    `zero.initialize_engine(..., mpu=mesh.mpu)`.

    Each TP rank mixes its own heads with the (replicated) gates, so a gate's gradient there covers those heads
    only; the gate values enter the decoder through megatron's copy-to-TP region (identity forward, all-reduce over
    TP backward), so every TP rank ends with the whole gradient. The regularizer reads the gates outside that
    region and keeps its plain gradient. SP needs nothing more: each SP rank's gradient is a partial sum over the
    step's tokens, and ZeRO sums (averages) it over SP x DP, see `answer_loss_scale`.
    """
    if not hasattr(model, "gates") or not hasattr(model, "lm"):
        raise FlashMorphError(f"parallelize_gate_search takes a MorphableLM, got {type(model).__name__}")
    if mesh.tp_size > 1:
        if tensor_parallel_state(model.lm) is None:
            apply_tensor_parallel(model.lm, mesh)  # refuses per-head gates: each TP rank holds a slice of the heads
        else:  # split at load (sharded_load), before the gates existed
            check_gate_granularity(mesh.layout, model.morph_config.gate_granularity)
        decoder = model.lm.get_decoder()
        decoder.register_forward_pre_hook(_tp_gate_region(mesh.tp_group), with_kwargs=True)
    if mesh.sp_size > 1:
        install_sequence_parallel(model, mesh.sp_group, micro_batch_size)  # after TP: it reads the local heads
    return model


def _tp_gate_region(tp_group):
    def enter(module: nn.Module, args: tuple, kwargs: dict):
        gates = kwargs.get("morph_gates")
        if gates is not None:
            kwargs["morph_gates"] = copy_to_tensor_model_parallel_region(gates, group=tp_group)
        return args, kwargs

    return enter


def local_gate_batch(batch: dict, mesh: Mesh, device) -> dict:
    """This rank's share of its DP replica's [B, T] batch, as MorphableLM keywords: under SP its sequence slice
    with global positions and labels shifted on the whole sequence; TP ranks of one replica take the same."""
    shard = shard_sequence(batch["input_ids"], batch["labels"], mesh.sp_rank, mesh.sp_size)
    return {key: value.to(device) for key, value in shard.items()}


def answer_loss_scale(local_tokens: int, mesh: Mesh, grad_accum_steps: int, device) -> float:
    """The factor on this rank's summed answer-token CE (over its shards of the step's micro batches) that makes
    ZeRO's gradient the step's mean CE: DeepSpeed divides each micro loss by the accumulation steps and averages
    over the SP x DP ranks (`mesh.grad_divisor`); tokens are counted over SP x DP, where each is seen once (TP ranks
    see the same ones). A regularizer on the gates, replicated on every rank, needs no scale (collective)."""
    total = torch.tensor(float(local_tokens), dtype=torch.float64, device=device)
    dist.all_reduce(total, group=mesh.sdp_group)
    return grad_accum_steps * mesh.grad_divisor / max(total.item(), 1.0)
