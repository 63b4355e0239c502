"""LoRA (peft) on megatron's tensor-parallel projections: peft's LoraParallelLinear around flashmorph's
tensor-returning parallel layers, how each adapter weight splits over TP, and slicing / gathering adapter files."""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from peft.tuners.lora.tp_layer import LoraParallelLinear
from torch import nn

from flashmorph.errors import ConfigError
from flashmorph.parallel import tp_rules
from flashmorph.parallel.mesh import Mesh
from flashmorph.parallel.tensor import (HFColumnParallelLinear, HFRowParallelLinear, gather_tensor_parallel_state,
                                        tensor_parallel_state)

_REPLICATED = tp_rules.TPRule(tp_rules.REPLICATED, None, None)
# peft's parameter names carry the adapter name ("lora_A.default.weight"), its files do not ("lora_A.weight")
_LORA_WEIGHT = re.compile(r"\.lora_([AB])\.(?:[^.]+\.)?weight$")


class _HFBackend:
    """The megatron namespace peft builds the adapters' own parallel layers from: ours, which return a tensor and
    keep plain state-dict keys (megatron's return (out, bias) and add `_extra_state` entries to adapter files)."""

    ColumnParallelLinear = HFColumnParallelLinear
    RowParallelLinear = HFRowParallelLinear


def broadcast_host_tensor(tensor: torch.Tensor, src: int, group) -> None:
    """dist.broadcast of a tensor that may still be on the host: peft builds the adapters before DeepSpeed moves the
    model to the accelerator, and an NCCL group takes device tensors only, so a host tensor travels through the
    current device there (gloo, the CPU tests' backend, takes it as it is)."""
    if tensor.device.type != "cpu" or dist.get_backend(group) == "gloo":
        dist.broadcast(tensor, src, group=group)
        return
    from deepspeed.accelerator import get_accelerator

    on_device = tensor.to(get_accelerator().current_device_name(), copy=True)
    dist.broadcast(on_device, src, group=group)
    with torch.no_grad():
        tensor.copy_(on_device)


class TensorParallelLoraLinear(LoraParallelLinear):
    """peft's LoraParallelLinear on a HFColumnParallelLinear / HFRowParallelLinear.

    Column-parallel base (input whole, output rows split): lora_A whole, lora_B split by output rows; its input copy
    all-reduces lora_A's gradient over TP. Row-parallel base (input split): lora_A split by input columns, its output
    all-reduced; lora_B whole. peft's own forward unpacks megatron's (out, bias) tuples, which ours do not return.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs):
        if getattr(config, "init_lora_weights", True) not in (True, False, "gaussian"):
            raise ConfigError(f"LoRA init_lora_weights={config.init_lora_weights!r} cannot run under tensor "
                              "parallelism; use the default init")
        # a copy: peft switches the adapters' config to fp32 params, the base layer keeps its own
        megatron_config = dataclasses.replace(base_layer.config, perform_initialization=False)
        super().__init__(base_layer, adapter_name, config, backend=_HFBackend, megatron_config=megatron_config,
                         **kwargs)

    def update_layer(self, adapter_name, *args, **kwargs) -> None:
        # peft 0.21's LoraParallelLinear never fills lora_bias (it refuses lora_bias=True), which its init reads
        self.lora_bias[adapter_name] = False
        super().update_layer(adapter_name, *args, **kwargs)
        split = self.lora_A[adapter_name] if self.is_parallel_a else self.lora_B[adapter_name]
        # megatron's own init is off (perform_initialization=False), and with it the tagging: tag the split weight
        # as TP so DeepSpeed's grad norm counts it on every TP rank, like apply_tensor_parallel's projections
        set_tensor_model_parallel_attributes(split.weight, True, 1 if self.is_parallel_a else 0, 1)

    def reset_lora_parameters(self, adapter_name, init_lora_weights) -> None:
        super().reset_lora_parameters(adapter_name, init_lora_weights)
        if adapter_name not in self.lora_A:
            return
        group = self.get_base_layer().tp_group
        src = dist.get_global_rank(group, 0)
        # every TP rank must hold the same whole adapter (a seed drawn differently would go unnoticed until export)
        whole = self.lora_B[adapter_name] if self.is_parallel_a else self.lora_A[adapter_name]
        broadcast_host_tensor(whole.weight.data, src, group)
        if self.is_parallel_a and init_lora_weights is True:
            self._kaiming_like_unsplit(self.lora_A[adapter_name].weight, group, src)

    @staticmethod
    def _kaiming_like_unsplit(local: torch.Tensor, group, src: int) -> None:
        """peft's kaiming init of a split lora_A drew from the slice's fan-in (in / tp); draw the whole [r, in]
        matrix as TP=1 would, on TP rank 0, and keep this rank's columns of it."""
        tp, tp_rank = dist.get_world_size(group), dist.get_rank(group)
        full = torch.empty(local.shape[0], local.shape[1] * tp, dtype=local.dtype, device=local.device)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))  # [r, in]
        broadcast_host_tensor(full, src, group)
        with torch.no_grad():
            local.copy_(full.chunk(tp, dim=1)[tp_rank])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ConfigError("LoRA under tensor parallelism runs one adapter per batch (no adapter_names=)")
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_input = self._cast_input_dtype(self.lora_dropout[name](x), self.lora_A[name].weight.dtype)
            result = result + self.lora_B[name](self.lora_A[name](lora_input)) * self.scaling[name]
        return result.to(result_dtype)


def register_tensor_parallel_lora(config) -> None:
    """Make a peft LoraConfig wrap flashmorph's parallel projections (call before get_peft_model). The mapping is
    not a config field, so adapter_config.json stays the plain TP=1 file."""
    config._register_custom_module({HFColumnParallelLinear: TensorParallelLoraLinear,
                                    HFRowParallelLinear: TensorParallelLoraLinear})


def lora_tp_rule(name: str) -> tp_rules.TPRule:
    """The TP rule of a peft-named weight: an adapter weight is split where its base projection splits the side
    it touches (lora_B of a column-parallel layer by rows, lora_A of a row-parallel one by columns), else whole."""
    match = _LORA_WEIGHT.search(name)
    if match is None:
        return tp_rules.tp_rule(name.replace(".base_layer.", "."))
    base = tp_rules.tp_rule(name[:match.start()] + ".weight")
    touches_split_side = (base.kind == tp_rules.COLUMN) == (match.group(1) == "B")
    return base if base.kind in (tp_rules.COLUMN, tp_rules.ROW) and touches_split_side else _REPLICATED


def slice_adapter_state(state: dict[str, torch.Tensor], lm: nn.Module) -> dict[str, torch.Tensor]:
    """This TP rank's slices of a whole (TP=1 format) adapter state, for the TP model `lm` (apply_tensor_parallel'd
    base model or its peft wrapper); the state as it is when `lm` is not split."""
    tp_state = tensor_parallel_state(lm.get_base_model() if hasattr(lm, "get_base_model") else lm)
    if tp_state is None or tp_state.size == 1:
        return state
    return {name: tp_rules.split_for_tp(tensor, lora_tp_rule(name), tp_state.size)[tp_state.rank].contiguous()
            for name, tensor in state.items()}


def gather_lora_model_state(peft_model: nn.Module, mesh: Mesh, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """Every parameter of a TP peft model, whole and under its peft name (as zero.gather_state_dict gives at TP=1),
    so lora.save_adapter and lora.merge_lora_state write the TP=1 files; every rank calls, `keep` ranks get it."""
    return gather_tensor_parallel_state(peft_model, mesh, rule_of=lora_tp_rule, keep=keep)
