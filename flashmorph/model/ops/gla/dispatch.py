"""The one place that picks the GLA backend: fla's kernels on CUDA where fla imports, the chunked torch path and the
naive step elsewhere. `backend` is the recipe's `morph.linear_backend`, one of `LINEAR_BACKENDS` (defined with the
recipe's settings in flashmorph/model/config.py, which stays torch-free)."""

from __future__ import annotations

import torch

from flashmorph.errors import ConfigError, check_choice
from flashmorph.model.config import LINEAR_BACKENDS
from flashmorph.model.ops.gla.chunked import gla_chunked
from flashmorph.model.ops.gla.fla import chunk_gla_kernel, fla_chunk_gla, fla_gla_step, fused_recurrent_gla_kernel
from flashmorph.model.ops.gla.naive import gla_step


def resolve_backend(backend: str, on_cuda: bool) -> str:
    """Map a linear_backend setting (auto, naive, fla) to the backend that will run: naive or fla."""
    check_choice("linear_backend", backend, LINEAR_BACKENDS)
    if backend == "fla" and not on_cuda:
        raise ConfigError("linear_backend=fla needs CUDA tensors; use linear_backend=auto or naive")
    if backend == "fla" and chunk_gla_kernel() is None:
        raise ConfigError("linear_backend=fla but fla does not import; install flash-linear-attention or use auto")
    if backend == "auto":
        return "fla" if on_cuda and chunk_gla_kernel() is not None else "naive"
    return backend


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                           scale: float = 1.0, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, backend: str = "auto"
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA with the `gla_recurrent_reference` contract, dispatched to fla `chunk_gla` or `gla_chunked`.

    backend: "naive" (torch, any device), "fla" (CUDA only), "auto" (fla on CUDA when it imports).
    """
    if resolve_backend(backend, q.is_cuda) == "naive":
        return gla_chunked(q, k, v, log_decay, scale, initial_state, output_final_state)
    return fla_chunk_gla(q, k, v, log_decay, scale, initial_state, output_final_state)


def gated_linear_attention_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, log_decay_t: torch.Tensor,
                                state: torch.Tensor | None, scale: float = 1.0, backend: str = "auto"
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with the `gla_step` contract, dispatched to fla `fused_recurrent_gla` or `gla_step`.

    q_t, k_t, log_decay_t [B, 1, H, D], v_t [B, 1, H, Dv], state [B, H, D, Dv] or None.
    Returns (o_t [B, 1, H, Dv], new_state [B, H, D, Dv] fp32).
    """
    if resolve_backend(backend, q_t.is_cuda) == "naive" or fused_recurrent_gla_kernel() is None:
        return gla_step(q_t, k_t, v_t, log_decay_t, state, scale)
    return fla_gla_step(q_t, k_t, v_t, log_decay_t, state, scale)
