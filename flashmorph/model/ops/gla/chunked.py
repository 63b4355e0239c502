"""Chunked GLA in plain torch ops: the CPU fast path (autograd gives the backward), with the contract of
`naive.gla_recurrent_reference`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashmorph.model.ops.gla.naive import compute_dtype


def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, scale: float = 1.0,
                initial_state: torch.Tensor | None = None, output_final_state: bool = False, chunk_size: int = 16
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA, same contract as `gla_recurrent_reference`; O(T*C*D + T*D*Dv) work.

    Every exponent is a difference of chunk-local cumulative log-decays taken "later minus earlier",
    so it is <= 0: no overflow however strong the decay, and no inf*0 in forward or backward.
    """
    dtype = compute_dtype(q, k, v, log_decay, initial_state)
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    # the intra-chunk decay tensor is [C, C, D] per chunk, so small chunks keep it cheap (fla's kernels
    # sub-chunk by 16 for the same reason); a short sequence is one chunk of its own length, unpadded
    chunk = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // chunk)
    pad = num_chunks * chunk - seq_len

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # zero padding at the end is inert: k = v = 0 adds nothing, g = 0 keeps the state
        x = x.to(dtype).transpose(1, 2)  # [B, H, T, d]
        x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(batch, heads, num_chunks, chunk, x.shape[-1])  # [B, H, N, C, d]

    q_c, k_c, v_c, g_c = (to_chunks(x) for x in (q, k, v, log_decay))
    b = g_c.cumsum(dim=-2)  # [B, H, N, C, D] chunk-local cumulative log-decay
    b_last = b[..., -1:, :]  # [B, H, N, 1, D]

    # intra-chunk: A_ij = sum_d q_id k_jd exp(b_id - b_jd) for j <= i
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # [C, C]
    pair_diff = b[..., :, None, :] - b[..., None, :, :]  # [B, H, N, C, C, D]
    pair_decay = pair_diff.masked_fill(~causal[..., None], float("-inf")).exp()
    scores = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", q_c, k_c, pair_decay)  # [B, H, N, C, C]
    o = scores @ v_c  # [B, H, N, C, Dv]

    # inter-chunk: states entering each chunk, carried sequentially over chunks
    k_to_end = k_c * (b_last - b).exp()  # [B, H, N, C, D]
    chunk_kv = k_to_end.transpose(-1, -2) @ v_c  # [B, H, N, D, Dv]
    chunk_decay = b_last[..., 0, :].exp()  # [B, H, N, D]
    state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=dtype)  # [B, H, D, Dv]
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    entering = []
    for n in range(num_chunks):
        entering.append(state)
        state = chunk_decay[:, :, n, :, None] * state + chunk_kv[:, :, n]
    entering = torch.stack(entering, dim=2)  # [B, H, N, D, Dv]
    o = o + (q_c * b.exp()) @ entering

    o = (scale * o).reshape(batch, heads, num_chunks * chunk, value_dim)[:, :, :seq_len]
    o = o.transpose(1, 2).to(v.dtype)  # [B, T, H, Dv]
    return o, (state if output_final_state else None)
