"""Sharded load of a HF causal LM under tensor parallelism: the model is built with its parameters on the meta device,
megatron's parallel layers are swapped in there, and each rank then reads only its own TP slice of every weight from
the safetensors files, so a rank's peak host memory is its shard plus one tensor, never the whole model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from flashmorph.errors import CheckpointError
from flashmorph.model.hf_dir import read_safetensors_header, validate_model_dir, weight_files
from flashmorph.model.load import load_causal_lm, torch_dtype
from flashmorph.parallel import tp_rules
from flashmorph.parallel.mesh import Mesh
from flashmorph.parallel.tensor import apply_tensor_parallel, holds_slice
from flashmorph.parallel.zero import zero3_model_init

log = logging.getLogger(__name__)


def build_empty_causal_lm(config, dtype: torch.dtype) -> nn.Module:
    """The HF causal LM of a transformers `config` with every parameter on the meta device (no memory) and its
    buffers real: RoPE's inv_freq is computed from the config on CPU exactly as a normal build does."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return lm.eval()


def tensor_files(model_dir: str | Path, where: str) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF weight name -> (the safetensors file holding it, its full shape), from the headers only."""
    found = {}
    for path in weight_files(Path(model_dir), where):
        for name, (shape, _) in read_safetensors_header(path, where).items():
            found[name] = (path, tuple(shape))
    return found


def read_tp_slice(path: Path, name: str, full_shape: tuple[int, ...], rule: tp_rules.TPRule, tp: int,
                  tp_rank: int) -> torch.Tensor:
    """This rank's piece of `name` (the whole tensor when `rule` keeps it replicated), read through
    safe_open(...).get_slice; only that piece outlives the call."""
    # a handle per tensor: its memory map (whose touched pages count as this process's memory) ends with it
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        if not holds_slice(rule, tp):
            return handle.get_tensor(name)
        width = full_shape[rule.split_dim] // tp
        start, stop = tp_rank * width, (tp_rank + 1) * width
        window = handle.get_slice(name)
        piece = window[start:stop] if rule.split_dim == 0 else window[:, start:stop]
    # safetensors 0.8 reads the whole tensor and returns a view of it: copy the piece out so the full tensor is
    # freed now (one full tensor in flight) instead of living on in every rank's parameter
    return piece.clone(memory_format=torch.contiguous_format)


def materialize_from_safetensors(lm: nn.Module, model_dir: str | Path, tp: int, tp_rank: int,
                                 where: str | None = None) -> None:
    """Replace every meta parameter of `lm` (already split for `tp`) by this rank's piece read from the HF
    safetensors files of `model_dir`; parameter attributes (megatron's TP tags) and weight tying are kept."""
    where = where or str(model_dir)
    files = tensor_files(model_dir, where)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}  # a tied parameter appears under several modules
    for module in lm.modules():
        for leaf, param in module._parameters.items():
            if param is not None and param.is_meta:
                owners.setdefault(id(param), []).append((module, leaf))
    for name, param in list(lm.named_parameters()):
        if not param.is_meta:
            continue
        if name not in files:
            raise CheckpointError(f"{where} lacks the weight {name}; the directory holds another model's weights")
        path, full_shape = files[name]
        rule = tp_rules.tp_rule(name)
        value = read_tp_slice(path, name, full_shape, rule, tp, tp_rank).to(param.dtype)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"{name} in {where} gives TP rank {tp_rank} of {tp} a {list(value.shape)} piece, "
                                  f"the model holds {list(param.shape)}; config.json and the weights disagree")
        loaded = nn.Parameter(value, requires_grad=param.requires_grad)
        loaded.__dict__.update(param.__dict__)  # tensor_model_parallel, partition_dim, ... set by megatron
        for module, leaf in owners[id(param)]:
            module._parameters[leaf] = loaded
    left = [name for name, tensor in [*lm.named_parameters(), *lm.named_buffers()] if tensor.is_meta]
    if left:
        raise CheckpointError(f"{left[0]} is still on the meta device after loading {where}; "
                              "this model has a tensor the sharded loader does not know how to fill")


def load_sharded_causal_lm(model_dir: str | Path, mesh: Mesh, dtype: str = "bfloat16") -> nn.Module:
    """`model.load.load_causal_lm` for a rank of `mesh`: the same model, with megatron's TP layers on `mesh.tp_group`
    (as `apply_tensor_parallel` leaves them), holding only this rank's slices; every rank reads the files itself.

    Peak host memory per rank: its TP shard of the projections, the replicated embedding / lm_head / norms, plus
    one full tensor in flight. At TP=1 it loads the whole model; with ZeRO-3 and TP=1 use `zero.zero3_model_init`
    around `load_causal_lm` instead, which partitions at load.
    """
    from transformers import AutoConfig

    where = f"model.path={model_dir}"
    validate_model_dir(model_dir, where)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    lm = build_empty_causal_lm(config, torch_dtype(dtype))
    apply_tensor_parallel(lm, mesh)  # on meta: the swap checks every split and allocates nothing that stays
    tp_rank = dist.get_rank(group=mesh.tp_group)
    materialize_from_safetensors(lm, model_dir, mesh.tp_size, tp_rank, where)
    log.info("loaded TP rank %d of %d from %s", tp_rank, mesh.tp_size, model_dir)
    return lm


def load_for_mesh(model_dir: str | Path, mesh: Mesh, dtype: str, ds_config: dict) -> nn.Module:
    """Where a stage's weights land, the one rule: at TP=1 `load_causal_lm` under zero.Init (ZeRO-3 partitions at
    load; a no-op below stage 3), with TP each rank's slices only, in megatron's layers (`load_sharded_causal_lm`)."""
    if mesh.tp_size == 1:
        with zero3_model_init(ds_config):
            return load_causal_lm(model_dir, dtype)
    return load_sharded_causal_lm(model_dir, mesh, dtype)
