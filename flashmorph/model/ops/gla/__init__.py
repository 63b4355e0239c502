"""Gated linear attention, laid out as fla's ops/gla: `naive` (the recurrence and the decode step, the reference),
`chunked` (the torch fast path), `fla` (fla's CUDA kernels) and `dispatch` (picks one by `linear_backend`)."""

from flashmorph.model.ops.gla.chunked import gla_chunked
from flashmorph.model.ops.gla.dispatch import (
    LINEAR_BACKENDS,
    gated_linear_attention,
    gated_linear_attention_step,
    resolve_backend,
)
from flashmorph.model.ops.gla.naive import gla_recurrent_reference, gla_step

__all__ = [
    "LINEAR_BACKENDS",
    "gated_linear_attention",
    "gated_linear_attention_step",
    "gla_chunked",
    "gla_recurrent_reference",
    "gla_step",
    "resolve_backend",
]
