"""Ulysses sequence parallelism (DeepSpeed ALST) around flashmorph's attention: each rank of an SP group holds a
contiguous slice of the sequence, and an all-to-all before attention gives it every token for a slice of the heads.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.model.morph import ATTN_KEY, attention_modules, morph_attention
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.layout import ParallelLayout, check_layout, check_seq_len

# Never put "flash" in this name: transformers would treat it as a flash-attention request.
SP_ATTN_KEY = "morph_sp"
_STATE_ATTR = "_flashmorph_sequence_parallel"  # on the HF model: the installed SequenceParallelState
_MODULE_ATTR = "sequence_parallel"  # on every attention module: the same state, read by the attention function


@dataclass
class SequenceParallelState:
    """What `install_sequence_parallel` attached to a model; a plain record, so no module or parameter is added."""

    ulysses: nn.Module  # deepspeed's UlyssesSPAttentionHF wrapping morph_attention, shared by all layers
    micro_batch_size: int
    sp_size: int
    sp_rank: int
    hook: torch.utils.hooks.RemovableHandle  # the decoder pre-hook that checks inputs


def sequence_parallel_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The function registered as "morph_sp": morph_attention behind the model's Ulysses all-to-all.

    It holds no state itself (the SP group lives on the model), so its registry entry is harmless to any model
    that does not select it.
    """
    state: SequenceParallelState | None = getattr(module, _MODULE_ATTR, None)
    if state is None:
        raise FlashMorphError(
            f"{SP_ATTN_KEY!r} attention without a sequence-parallel group; call install_sequence_parallel"
        )
    if kwargs.get("morph_cache") is not None:
        raise FlashMorphError(
            "sequence parallelism runs full-sequence forwards only; uninstall_sequence_parallel before generating"
        )
    if query.shape[0] != state.micro_batch_size:
        raise ConfigError(
            f"sequence parallelism was installed with micro_batch_size={state.micro_batch_size} but got a batch of "
            f"{query.shape[0]}; install with the micro batch size the loader yields"
        )
    gates = kwargs.get("morph_gates")
    if gates is not None and gates.dim() == 2:
        # per-head gates [layers, heads]: after the all-to-all this rank holds query heads
        # [sp_rank * H/sp, (sp_rank + 1) * H/sp), in order, so it mixes with those heads' gates only
        local = gates.shape[1] // state.sp_size
        kwargs["morph_gates"] = gates[:, state.sp_rank * local:(state.sp_rank + 1) * local]
    # the model built its mask for the local shard; after the all-to-all SDPA masks the gathered sequence with
    # is_causal (mask None, more than one query), and the linear branch is causal by construction
    return state.ulysses(module, query, key, value, None, *args, **kwargs)


def _no_mask(*args, **kwargs):
    """Mask builder for "morph_sp": the SP path discards masks, so none is built (no T x T tensor at 128K)."""
    return None


def register_sequence_parallel_attention() -> None:
    """Register "morph_sp" (attention function and mask builder) with transformers; idempotent."""
    if SP_ATTN_KEY not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SP_ATTN_KEY, sequence_parallel_attention)
    if SP_ATTN_KEY not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(SP_ATTN_KEY, _no_mask)


def _hf_model(lm: nn.Module) -> nn.Module:
    # a MorphableLM holds the HF model as `.lm`; a hybrid is the HF model itself
    return lm.lm if hasattr(lm, "gates") and hasattr(lm, "lm") else lm


def _tensor_parallel_size(lm: nn.Module) -> int:
    """The TP degree apply_tensor_parallel split `lm` by (1 when it was not applied)."""
    # TP can only have been applied if its module was imported; checking sys.modules spares the megatron import
    tensor = sys.modules.get("flashmorph.parallel.tensor")
    state = tensor.tensor_parallel_state(lm) if tensor is not None else None
    return state.size if state is not None else 1


def _local_heads(lm: nn.Module) -> tuple[int, int]:
    """(query heads, kv heads) this rank's attention modules hold: all of them, or apply_tensor_parallel's slice."""
    shape, tp = ModelShape.from_config(lm.config), _tensor_parallel_size(lm)
    return shape.num_heads // tp, shape.num_kv_heads // tp


def check_sequence_parallel(lm: nn.Module, sp_size: int) -> None:
    """Raise a one-line ConfigError where a morphed/hybrid model cannot run with `sp_size` Ulysses ranks."""
    lm = _hf_model(lm)
    check_layout(ParallelLayout(tensor=_tensor_parallel_size(lm), sequence=sp_size, data=1), ModelShape.from_config(lm.config))
    modules = attention_modules(lm)
    specs = [getattr(module, "morph", None) for module in modules]
    if any(spec is None for spec in specs) or lm.config._attn_implementation not in (ATTN_KEY, SP_ATTN_KEY):
        raise FlashMorphError(
            "sequence parallelism wraps the morph attention; call morph_model or apply_hybrid_layout first"
        )
    if any(spec.mode != "linear" and spec.config.softmax_impl == "eager" for spec in specs):
        # eager attention needs a 4D mask to be causal; the SP path discards masks and relies on SDPA's is_causal
        raise ConfigError("morph.softmax_impl=eager cannot run with sequence parallelism; use morph.softmax_impl=sdpa")


def _input_guard(decoder: nn.Module):
    """Decoder pre-hook: SP forwards need global position ids, no padding mask and no cache."""
    names = list(inspect.signature(decoder.forward).parameters)

    def guard(module: nn.Module, args: tuple, kwargs: dict):
        bound = dict(zip(names, args)) | kwargs
        if bound.get("position_ids") is None:
            raise FlashMorphError(
                "sequence parallelism needs global position_ids in every forward; "
                "pass shard_sequence(...)['position_ids']"
            )
        mask = bound.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise FlashMorphError(
                "sequence parallelism cannot mask padding; pack or crop samples to full length instead"
            )
        if bound.get("cache") is not None or bound.get("past_key_values") is not None or bound.get("use_cache"):
            raise FlashMorphError("sequence parallelism runs full-sequence forwards only; pass use_cache=False")
        if "use_cache" not in names[:len(args)]:
            kwargs["use_cache"] = False  # the config's default (True) would build a per-shard cache
        return args, kwargs

    return guard


def install_sequence_parallel(lm: nn.Module, sp_group, micro_batch_size: int) -> None:
    """Run `lm`'s morph attention under Ulysses SP over `sp_group` (a torch process group, e.g. one made next to
    megatron's TP/DP groups). `lm` is a MorphableLM, its `.lm`, or a hybrid; idempotent (a second call replaces
    the group). A group of one rank leaves the model as it is. Feed each rank `shard_sequence(...)`'s slice."""
    import deepspeed.comm as ds_dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    lm = _hf_model(lm)
    uninstall_sequence_parallel(lm)
    if not ds_dist.is_initialized():
        raise FlashMorphError(
            "sequence parallelism needs deepspeed.comm; call flashmorph.parallel.distributed.init_distributed first"
        )
    sp_size = ds_dist.get_world_size(sp_group)
    check_sequence_parallel(lm, sp_size)
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if sp_size == 1:
        return
    shape = ModelShape.from_config(lm.config)
    heads, kv_heads = _local_heads(lm)
    register_sequence_parallel_attention()
    ulysses = UlyssesSPAttentionHF(
        attn=morph_attention,  # the unwrapped function, whatever else is registered under "morph"
        batch_size=micro_batch_size,
        attn_head_count=heads,
        attn_head_size=shape.head_dim,
        kv_head_count=kv_heads,
        num_hidden_layers=shape.num_layers,
        process_group=sp_group,
        seq_length_is_variable=True,
    )
    ulysses.core_attn_implementation = ATTN_KEY
    decoder = lm.get_decoder()
    # prepend: run before the hybrid model's cache hook, so a forward never builds a cache it would hand on
    hook = decoder.register_forward_pre_hook(_input_guard(decoder), with_kwargs=True, prepend=True)
    state = SequenceParallelState(ulysses, micro_batch_size, sp_size, ds_dist.get_rank(sp_group), hook)
    for module in attention_modules(lm):
        setattr(module, _MODULE_ATTR, state)
    setattr(lm, _STATE_ATTR, state)
    lm.config._attn_implementation = SP_ATTN_KEY


def uninstall_sequence_parallel(lm: nn.Module) -> None:
    """Undo `install_sequence_parallel`: the model runs the plain "morph" attention on whole sequences again."""
    lm = _hf_model(lm)
    state = getattr(lm, _STATE_ATTR, None)
    if state is None:
        return
    state.hook.remove()
    heads, kv_heads = _local_heads(lm)
    for module in attention_modules(lm):
        if hasattr(module, _MODULE_ATTR):
            delattr(module, _MODULE_ATTR)
        # ALST rewrites this when it replicates kv heads (kv heads < SP size); restore the model's own value
        module.num_key_value_groups = heads // kv_heads
    delattr(lm, _STATE_ATTR)
    lm.config._attn_implementation = ATTN_KEY


def is_sequence_parallel(lm: nn.Module) -> bool:
    """True while `install_sequence_parallel` is in effect on `lm`."""
    return getattr(_hf_model(lm), _STATE_ATTR, None) is not None


def shard_sequence(input_ids: torch.Tensor, labels: torch.Tensor | None, sp_rank: int, sp_size: int) -> dict:
    """This rank's contiguous slice of a [B, T] batch: `input_ids`, global `position_ids` and `shift_labels`.

    Labels are shifted on the full sequence before slicing (the target of a shard's last token is the next shard's
    first token; the last token of the sequence gets -100), so a loss over `model(**shard)` sums the local tokens.
    """
    if input_ids.dim() != 2:
        raise FlashMorphError(f"shard_sequence takes input_ids [batch, seq], got shape {tuple(input_ids.shape)}")
    if not 0 <= sp_rank < sp_size:
        raise ConfigError(f"sp_rank={sp_rank} must lie in [0, sp_size={sp_size})")
    batch, seq_len = input_ids.shape
    check_seq_len(sp_size, seq_len)
    local = seq_len // sp_size
    start = sp_rank * local
    position_ids = torch.arange(start, start + local, device=input_ids.device)
    shard = {
        "input_ids": input_ids[:, start:start + local].contiguous(),  # [B, T/sp]
        # contiguous [B, T/sp]: ALST all-gathers these, so every rank's must have the same shape
        "position_ids": position_ids.unsqueeze(0).expand(batch, -1).contiguous(),
    }
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise FlashMorphError(
                f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape"
            )
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: the target of token t sits at t
        shard["shift_labels"] = shift_labels[:, start:start + local].contiguous()
    return shard
