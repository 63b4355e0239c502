"""Tensor-parallel rules: how megatron-core splits each HF weight (kind, dim, unit), and the checks a TP size must pass
(the layout check itself is parallel/layout.py's; the model's sizes are model/shape.py's ModelShape).

Owned by parallel/ (parallel/tensor.py cuts a live model by them); checkpoint/reshard asks them through its adapter.
"""

import re
from dataclasses import dataclass

import torch

from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.layout import DegreeNames, ParallelLayout, check_layout

REPLICATED, COLUMN, ROW, VOCAB = "replicated", "column", "row", "vocab"


_LAYOUT_DIMS = ("model_type", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "intermediate_size")
RESHARD_NAMES = DegreeNames(tensor="--tp", sequence="sequence_parallel")


def layout_dims(shape: ModelShape) -> dict:
    """The sizes a TP checkpoint records (its layout file's "dims") and is checked against when read back."""
    return {name: getattr(shape, name) for name in _LAYOUT_DIMS} | {"tie_word_embeddings": shape.tie_embeddings}


@dataclass(frozen=True)
class TPRule:
    """How one HF weight lives in megatron-core TP: its kind, the dim it is split on, what that dim counts."""

    kind: str  # replicated | column (ColumnParallelLinear) | row (RowParallelLinear) | vocab (VocabParallel*)
    split_dim: int | None  # dim of the HF tensor cut into tp equal contiguous pieces; None when replicated
    unit: str | None  # what the split dim counts (heads, kv heads, ...), for error messages and checks


# Megatron's partitioning of the HF projections it replaces in place (docs/parallelism.md): column-parallel layers
# own a contiguous block of output rows, row-parallel layers a block of input columns, vocab-parallel layers a block
# of the vocabulary. A contiguous block of q rows is a block of whole query heads, and of k/v rows a block of whole
# kv heads; with tp | num_kv_heads rank r's query heads use exactly rank r's kv heads, so GQA stays correct.
_RULES: tuple[tuple[re.Pattern, TPRule], ...] = tuple((re.compile(pattern), rule) for pattern, rule in (
    (r"(^|\.)embed_tokens\.weight$", TPRule(VOCAB, 0, "vocab_size")),
    (r"(^|\.)lm_head\.weight$", TPRule(VOCAB, 0, "vocab_size")),
    (r"\.self_attn\.q_proj\.(weight|bias)$", TPRule(COLUMN, 0, "num_heads")),
    (r"\.self_attn\.[kv]_proj\.(weight|bias)$", TPRule(COLUMN, 0, "num_kv_heads")),
    (r"\.self_attn\.o_proj\.weight$", TPRule(ROW, 1, "num_heads")),
    (r"\.mlp\.(gate|up)_proj\.(weight|bias)$", TPRule(COLUMN, 0, "intermediate_size")),
    (r"\.mlp\.down_proj\.weight$", TPRule(ROW, 1, "intermediate_size")),
    # a row-parallel bias is added once, after the all-reduce, so every rank holds all of it
    (r"\.(self_attn\.o_proj|mlp\.down_proj)\.bias$", TPRule(REPLICATED, None, None)),
    # input/post-attention/final RMSNorm and Qwen3's per-head q/k norms (shared by all heads)
    (r"norm\.weight$", TPRule(REPLICATED, None, None)),
))


def tp_rule(hf_name: str) -> TPRule:
    """The TP rule of a HF weight name; CheckpointError for a weight flashmorph does not know how to split."""
    for pattern, rule in _RULES:
        if pattern.search(hf_name):
            return rule
    raise CheckpointError(f"no tensor-parallel rule for weight {hf_name!r}; reshard supports the Llama/Qwen/Mistral "
                          "attention, MLP, norm and embedding weights only")


def hf_to_tp_name(hf_name: str) -> str:
    """The key of a weight in a TP rank's state dict. flashmorph's TP swaps megatron's parallel layers into the HF
    modules in place, so each rank keeps the HF keys; a rename (e.g. to GPTModel names) would go here and in
    tp_to_hf_name only."""
    return hf_name


def tp_to_hf_name(tp_name: str) -> str:
    return tp_name


def check_tp_size(shape: ModelShape, tp: int) -> None:
    """ConfigError (one line, naming the size) unless `tp` splits heads, kv heads, widths and vocab evenly."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"--tp must be an int >= 1, got {tp!r}")
    check_layout(ParallelLayout(tensor=tp, sequence=1, data=1), shape, names=RESHARD_NAMES, vocab_parallel=True)


def check_split_shape(hf_name: str, shape: tuple[int, ...], rule: TPRule, dims: ModelShape, tp: int) -> None:
    """The split dim must hold a whole number of the units it counts (e.g. kv heads x head_dim rows)."""
    if rule.split_dim is None:
        return
    count = getattr(dims, rule.unit)
    length = shape[rule.split_dim] if rule.split_dim < len(shape) else None
    if length is None or length % count or count % tp:
        raise CheckpointError(f"weight {hf_name} has shape {list(shape)}, which does not split into {tp} equal "
                              f"pieces of whole {rule.unit} (={count}) on dim {rule.split_dim}")


def split_for_tp(tensor: torch.Tensor, rule: TPRule, tp: int) -> list[torch.Tensor]:
    """The tp pieces of a full HF tensor, rank order; views where the split keeps them contiguous."""
    if rule.split_dim is None:
        return [tensor] * tp
    return list(torch.chunk(tensor, tp, dim=rule.split_dim))


def merge_from_tp(pieces: list[torch.Tensor], rule: TPRule, hf_name: str = "") -> torch.Tensor:
    """The full HF tensor from its TP pieces; replicated pieces must agree bit for bit."""
    if rule.split_dim is not None:
        return torch.cat(pieces, dim=rule.split_dim)
    first = _bytes(pieces[0])
    for rank, piece in enumerate(pieces[1:], start=1):
        if not torch.equal(_bytes(piece), first):  # bytes, so NaNs and -0.0 compare exactly
            raise CheckpointError(f"replicated weight {hf_name} differs between TP rank 0 and TP rank {rank}; "
                                  "the TP shards are inconsistent, re-create them from a consolidated checkpoint")
    return pieces[0]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def tp_piece_shape(shape: tuple[int, ...], rule: TPRule, tp: int) -> tuple[int, ...]:
    if rule.split_dim is None:
        return tuple(shape)
    out = list(shape)
    out[rule.split_dim] //= tp
    return tuple(out)
