"""Tensor parallelism for HF Llama/Qwen2/Qwen3/Mistral models: megatron-core's column/row-parallel linears are swapped
into every decoder layer's projections and filled with this rank's slice, cut by the TP rules
(`flashmorph.parallel.tp_rules`) from the loaded weights or read from TP shard files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from flashmorph.errors import CheckpointError, FlashMorphError
from flashmorph.io.safetensors import SafetensorsFile
from flashmorph.model.morph import attention_modules
from flashmorph.model.shape import ModelShape
from flashmorph.parallel import tp_rules
from flashmorph.parallel.layout import check_gate_granularity, check_layout
from flashmorph.parallel.mesh import Mesh
from flashmorph.parallel.tp_shards import TPSource

log = logging.getLogger(__name__)

# The projections megatron splits (docs/parallelism.md). Column-parallel layers own whole query / kv heads and MLP
# channels, so attention and the MLP's activation run on local slices with no communication; the row-parallel
# o_proj / down_proj all-reduce once per block. Embedding and lm_head stay replicated: the tiled loss keeps logits
# small (never T x vocab), so a vocab split would save little memory for an extra all-reduce and a parallel
# cross-entropy; vocab-parallel embedding/lm_head is future work (the TP shard format already splits them).
COLUMN_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")
_STATE_ATTR = "_flashmorph_tensor_parallel"


class _HFKeys:
    """Keep a TP rank's state dict to the HF keys (reshard's TP shard format): megatron adds a `_extra_state` entry
    (None, for Transformer Engine) to every state dict and expects one on load."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()  # only megatron's "add _extra_state" hook is registered by now


class HFColumnParallelLinear(_HFKeys, ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear returning its output only, like the nn.Linear it replaces."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_extra_state_hook()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(hidden)  # bias is added inside (skip_bias_add=False), so the second item is None
        return out


class HFRowParallelLinear(_HFKeys, RowParallelLinear):
    """megatron-core's RowParallelLinear (input already split by heads/channels) returning its output only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_extra_state_hook()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(hidden)
        return out


@dataclass(frozen=True)
class TensorParallelState:
    """What apply_tensor_parallel recorded on the model: the TP degree and this rank's place in it."""

    size: int
    rank: int
    num_local_heads: int
    num_local_kv_heads: int


def _no_init(weight: torch.Tensor) -> None:
    """megatron's init_method; unused (perform_initialization=False): every weight is overwritten with a slice."""


def _decoder_layers(lm: nn.Module):
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise FlashMorphError(f"{type(lm).__name__} has no get_decoder().layers; apply_tensor_parallel takes a HF "
                              "Llama/Qwen2/Qwen3/Mistral causal LM (for a MorphableLM pass its .lm)")
    return layers


def _submodule(layer: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return layer.get_submodule(parent_path), leaf


def _parallel_linear(kind: str, old: nn.Linear, mesh: Mesh) -> nn.Module:
    """An empty megatron layer for `old`'s shape; its weights are filled by the caller."""
    config = ModelParallelConfig(tensor_model_parallel_size=mesh.tp_size, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=old.weight.dtype)
    common = dict(config=config, init_method=_no_init, bias=old.bias is not None, skip_bias_add=False,
                  tp_group=mesh.tp_group)
    # built where `old` lives: on the meta device (sharded_load) a CPU build moved there would allocate a slice
    # for nothing and lose megatron's parameter attributes (moving to meta makes new Parameter objects)
    with torch.device(old.weight.device):
        if kind == tp_rules.COLUMN:
            layer = HFColumnParallelLinear(old.in_features, old.out_features, gather_output=False, **common)
        else:
            layer = HFRowParallelLinear(old.in_features, old.out_features, input_is_parallel=True, **common)
    # perform_initialization=False skips the call that tags TP weights; DeepSpeed's grad norm (clipping) counts a
    # weight on every TP rank only when it carries these attributes, otherwise on TP rank 0 alone
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, True, 0 if kind == tp_rules.COLUMN else 1, 1)
    layer.to(old.weight.device)
    for name, param in layer.named_parameters():
        param.requires_grad_(getattr(old, name).requires_grad)
    return layer


def _check_head_gates(lm: nn.Module, layout) -> None:
    for module in attention_modules(lm):
        spec = getattr(module, "morph", None)
        if spec is not None:
            check_gate_granularity(layout, spec.config.gate_granularity)


def apply_tensor_parallel(lm: nn.Module, mesh: Mesh, shards: str | Path | None = None) -> nn.Module:
    """Split `lm`'s decoder projections over `mesh.tp_group` in place and return it.

    Without `shards`, each rank keeps its slice of the weights `lm` holds (the same full weights on every rank).
    With `shards` (a directory written by `tools/reshard.py --to tp`), every weight of `lm` is read from it: this
    rank's slice of the projections, and the full norms / embedding / lm_head; shards of another TP size are
    merged and re-cut. Call before `deepspeed.initialize` (ZeRO then shards each rank's slices over SP x DP).
    The attention modules need no change: they infer the local head count from the projection outputs
    (`view(*shape, -1, head_dim)`), and heads / kv heads = num_key_value_groups holds on every rank.
    """
    layers = _decoder_layers(lm)
    tp, tp_rank = mesh.tp_size, dist.get_rank(group=mesh.tp_group)
    shape = ModelShape.from_config(lm.config)
    check_layout(mesh.layout, shape)
    if any(hasattr(p, "ds_id") for p in lm.parameters()):
        raise FlashMorphError("the model is already ZeRO-3 partitioned; apply_tensor_parallel before "
                              "deepspeed.initialize, on a model built without zero.Init")
    if getattr(lm, _STATE_ATTR, None) is not None:
        raise FlashMorphError("apply_tensor_parallel was already applied to this model")
    _check_head_gates(lm, mesh.layout)
    if tp > 1:
        prefix = _layers_prefix(lm, layers)
        for idx, layer in enumerate(layers):
            for kind, paths in ((tp_rules.COLUMN, COLUMN_PROJECTIONS), (tp_rules.ROW, ROW_PROJECTIONS)):
                for path in paths:
                    parent, leaf = _submodule(layer, path)
                    old = getattr(parent, leaf)
                    if not isinstance(old, nn.Linear):
                        raise FlashMorphError(f"layer {idx} {path} is a {type(old).__name__}, not nn.Linear; "
                                              "tensor parallelism swaps plain HF projections only")
                    new = _parallel_linear(kind, old, mesh)
                    if shards is None:
                        _copy_slices(new, old, f"{prefix}{idx}.{path}", shape, tp, tp_rank)
                    setattr(parent, leaf, new)
    setattr(lm, _STATE_ATTR, TensorParallelState(tp, tp_rank, shape.num_heads // tp, shape.num_kv_heads // tp))
    if shards is not None:
        load_tensor_parallel_shards(lm, shards, tp, tp_rank)
    return lm


def _layers_prefix(lm: nn.Module, layers) -> str:
    """The parameter-name prefix of decoder layer i, e.g. "model.layers." for a HF causal LM."""
    for name, module in lm.named_modules():
        if module is layers:
            return f"{name}."
    raise FlashMorphError(f"cannot find the decoder layers of {type(lm).__name__} among its modules")


def _copy_slices(new: nn.Module, old: nn.Linear, module_name: str, shape: ModelShape, tp: int,
                 tp_rank: int) -> None:
    for leaf, param in new.named_parameters():
        name = f"{module_name}.{leaf}"
        full = getattr(old, leaf).detach()
        rule = tp_rules.tp_rule(name)
        tp_rules.check_split_shape(name, tuple(full.shape), rule, shape, tp)
        with torch.no_grad():
            param.copy_(tp_rules.split_for_tp(full, rule, tp)[tp_rank])


def holds_slice(rule: tp_rules.TPRule, tp: int) -> bool:
    """Whether this process holds a slice (not the whole tensor) of a weight split by `rule`."""
    return tp > 1 and rule.kind in (tp_rules.COLUMN, tp_rules.ROW)


def load_tensor_parallel_shards(lm: nn.Module, shards: str | Path, tp: int, tp_rank: int) -> None:
    """Fill every parameter / persistent buffer of `lm` (already split for `tp`) from TP shard files."""
    shards = Path(shards)
    source = TPSource(shards)  # checks tp_layout.json against every rank file before anything is read
    own_file = SafetensorsFile(shards / source.layout["files"][tp_rank]) if source.tp == tp else None
    if own_file is None:
        log.info("re-cutting TP=%d shards in %s for TP=%d", source.tp, shards, tp)
    persistent = set(lm.state_dict(keep_vars=True))
    targets = dict(lm.named_parameters())
    targets.update((name, buf) for name, buf in lm.named_buffers() if name in persistent)
    missing = sorted(set(targets) - set(source.specs))
    extra = sorted(set(source.specs) - set(targets))
    if missing or extra:
        what = f"lack {missing[0]}" if missing else f"hold {extra[0]}, which the model lacks"
        raise CheckpointError(f"the TP shards in {shards} {what}; they were written for another model")
    for name, target in targets.items():
        rule = tp_rules.tp_rule(name)
        if not holds_slice(rule, tp):
            value = source.get(name)  # replicated, or vocab-split in the files and replicated here: merged
        elif own_file is not None:
            value = own_file.get(tp_rules.hf_to_tp_name(name))
        else:
            value = tp_rules.split_for_tp(source.get(name), rule, tp)[tp_rank]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{name} in {shards} gives TP rank {tp_rank} of {tp} a {list(value.shape)} "
                                  f"slice, the model holds {list(target.shape)}; shards of another model")
        with torch.no_grad():
            target.copy_(value)


def tensor_parallel_state(lm: nn.Module) -> TensorParallelState | None:
    """What apply_tensor_parallel recorded on `lm` (local head counts for e.g. Ulysses), or None."""
    return getattr(lm, _STATE_ATTR, None)


def gather_tensor_parallel(name: str, local: torch.Tensor, mesh: Mesh,
                           rule: tp_rules.TPRule | None = None) -> torch.Tensor:
    """The full HF tensor `name` (a weight or its gradient) from every TP rank's slice (collective over TP);
    `rule` overrides the TP rule of `name` (e.g. parallel.lora_tp's, for peft-named weights)."""
    rule = tp_rules.tp_rule(name) if rule is None else rule
    if not holds_slice(rule, mesh.tp_size):
        return local
    pieces = [torch.empty_like(local) for _ in range(mesh.tp_size)]
    dist.all_gather(pieces, local.contiguous(), group=mesh.tp_group)
    return tp_rules.merge_from_tp(pieces, rule, name)


def gather_tensor_parallel_state(lm: nn.Module, mesh: Mesh, rule_of=tp_rules.tp_rule,
                                 keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The model's full parameters under HF names (CPU copies), gathered over ZeRO-3 partitions (if any) and TP
    slices one tensor at a time (each split by `rule_of(name)`); every rank must call it, `keep` ranks get it."""
    from flashmorph.parallel.zero import gathered

    state = {} if keep else None
    for name, param in lm.named_parameters():
        with gathered([param]):
            full = gather_tensor_parallel(name, param.detach(), mesh, rule_of(name))
            if keep:
                state[name] = full.cpu().clone()
    return state
