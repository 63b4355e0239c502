"""Naive GLA in torch: the token-by-token recurrence (the ground truth every other path is tested against) and the
single decode step. Layout follows fla: `[batch, seq, heads, dim]`; the state is
`[batch, heads, key_dim, value_dim]`."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    # fp32 accumulation always; fp64 inputs stay fp64 so tests can check the algebra tightly
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def gla_recurrent_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                            scale: float = 1.0, initial_state: torch.Tensor | None = None,
                            output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GLA recurrence, the ground truth for every other path.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t.
    q, k, log_decay: [B, T, H, D]; v: [B, T, H, Dv]; initial_state: [B, H, D, Dv].
    Returns o [B, T, H, Dv] in v's dtype and the final state (fp32, fp64 for fp64 inputs) or None.
    """
    out_dtype = v.dtype
    dtype = compute_dtype(q, k, v, log_decay, initial_state)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, log_decay))
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    state = q.new_zeros(batch, heads, key_dim, value_dim)  # [B, H, D, Dv]
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    outputs = []
    for t in range(seq_len):
        decay = g[:, t].exp()  # [B, H, D]
        state = decay[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], state))
    o = torch.stack(outputs, dim=1)  # [B, T, H, Dv]
    return o.to(out_dtype), (state if output_final_state else None)


def gla_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, log_decay_t: torch.Tensor,
             state: torch.Tensor | None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: q_t, k_t, log_decay_t [B, 1, H, D], v_t [B, 1, H, Dv], state [B, H, D, Dv] or None.

    Returns (o_t [B, 1, H, Dv] in v_t's dtype, new_state [B, H, D, Dv] fp32) for the generation cache.
    """
    dtype = compute_dtype(q_t, k_t, v_t, log_decay_t, state)
    q, k, v, g = (x[:, 0].to(dtype) for x in (q_t, k_t, v_t, log_decay_t))  # [B, H, D|Dv]
    new_state = k[..., :, None] * v[..., None, :]  # [B, H, D, Dv]
    if state is not None:
        new_state = new_state + g.exp()[..., None] * state.to(dtype)
    o = scale * torch.einsum("bhd,bhde->bhe", q, new_state)
    return o[:, None].to(v_t.dtype), new_state
