"""Gated linear attention (GLA) for the linear branch: naive torch references, a chunked CPU path, fla's
`chunk_gla` (prefill) and `fused_recurrent_gla` (decode) on CUDA, and the Liger-style feature map and forget
gate built from q/k/v alone. Layout follows fla: `[batch, seq, heads, dim]`; the recurrent state is
`[batch, heads, key_dim, value_dim]`."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from flashmorph.errors import ConfigError

logger = logging.getLogger(__name__)

LINEAR_BACKENDS = ("auto", "naive", "fla")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    # fp32 accumulation always; fp64 inputs stay fp64 so tests can check the algebra tightly
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# ---------------------------------------------------------------------------------------------
# naive references
# ---------------------------------------------------------------------------------------------


def gla_recurrent_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GLA recurrence, the ground truth for every other path.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t.
    q, k, log_decay: [B, T, H, D]; v: [B, T, H, Dv]; initial_state: [B, H, D, Dv].
    Returns o [B, T, H, Dv] in v's dtype and the final state (fp32, fp64 for fp64 inputs) or None.
    """
    out_dtype = v.dtype
    dtype = _compute_dtype(q, k, v, log_decay, initial_state)
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


def gla_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    log_decay_t: torch.Tensor,
    state: torch.Tensor | None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: q_t, k_t, log_decay_t [B, 1, H, D], v_t [B, 1, H, Dv], state [B, H, D, Dv] or None.

    Returns (o_t [B, 1, H, Dv] in v_t's dtype, new_state [B, H, D, Dv] fp32) for the generation cache.
    """
    dtype = _compute_dtype(q_t, k_t, v_t, log_decay_t, state)
    q, k, v, g = (x[:, 0].to(dtype) for x in (q_t, k_t, v_t, log_decay_t))  # [B, H, D|Dv]
    new_state = k[..., :, None] * v[..., None, :]  # [B, H, D, Dv]
    if state is not None:
        new_state = new_state + g.exp()[..., None] * state.to(dtype)
    o = scale * torch.einsum("bhd,bhde->bhe", q, new_state)
    return o[:, None].to(v_t.dtype), new_state


# ---------------------------------------------------------------------------------------------
# chunked torch path (CPU fast path; plain ops so autograd gives the backward)
# ---------------------------------------------------------------------------------------------


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA, same contract as `gla_recurrent_reference`; O(T*C*D + T*D*Dv) work.

    Every exponent is a difference of chunk-local cumulative log-decays taken "later minus earlier",
    so it is <= 0: no overflow however strong the decay, and no inf*0 in forward or backward.
    """
    dtype = _compute_dtype(q, k, v, log_decay, initial_state)
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


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fla_chunk_gla():
    """fla's chunk_gla, or None where fla does not import (fla warns at import on CPU, so import late)."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception as err:  # fla pulls in triton; any failure just means "no fla"
        logger.warning("fla is unavailable (%s); linear attention uses the naive torch path", err)
        return None
    return chunk_gla


@functools.lru_cache(maxsize=1)
def _fla_fused_recurrent_gla():
    """fla's fused_recurrent_gla (the decode kernel), or None where fla does not import."""
    try:
        from fla.ops.gla import fused_recurrent_gla
    except Exception as err:  # same as _fla_chunk_gla: any failure means "no fla"
        logger.warning("fla is unavailable (%s); linear-attention decoding uses the naive torch step", err)
        return None
    return fused_recurrent_gla


def _resolve_backend(backend: str, on_cuda: bool) -> str:
    """Map a linear_backend setting (auto, naive, fla) to the backend that will run: naive or fla."""
    if backend not in LINEAR_BACKENDS:
        raise ConfigError(f"linear_backend={backend!r} is unknown; use one of {', '.join(LINEAR_BACKENDS)}")
    if backend == "fla" and not on_cuda:
        raise ConfigError("linear_backend=fla needs CUDA tensors; use linear_backend=auto or naive")
    if backend == "fla" and _fla_chunk_gla() is None:
        raise ConfigError("linear_backend=fla but fla does not import; install flash-linear-attention or use auto")
    if backend == "auto":
        return "fla" if on_cuda and _fla_chunk_gla() is not None else "naive"
    return backend


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA with the `gla_recurrent_reference` contract, dispatched to fla `chunk_gla` or `gla_chunked`.

    backend: "naive" (torch, any device), "fla" (CUDA only), "auto" (fla on CUDA when it imports).
    """
    if _resolve_backend(backend, q.is_cuda) == "naive":
        return gla_chunked(q, k, v, log_decay, scale, initial_state, output_final_state)
    chunk_gla = _fla_chunk_gla()
    if initial_state is not None:
        initial_state = initial_state.float()  # chunk_gla asserts an fp32 initial state
    return chunk_gla(
        q,
        k,
        v,
        g=log_decay,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )


def gated_linear_attention_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    log_decay_t: torch.Tensor,
    state: torch.Tensor | None,
    scale: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with the `gla_step` contract, dispatched to fla `fused_recurrent_gla` or `gla_step`.

    q_t, k_t, log_decay_t [B, 1, H, D], v_t [B, 1, H, Dv], state [B, H, D, Dv] or None.
    Returns (o_t [B, 1, H, Dv], new_state [B, H, D, Dv] fp32).
    """
    if _resolve_backend(backend, q_t.is_cuda) == "naive" or _fla_fused_recurrent_gla() is None:
        return gla_step(q_t, k_t, v_t, log_decay_t, state, scale)
    o, new_state = _fla_fused_recurrent_gla()(
        q_t,
        k_t,
        v_t,
        gk=log_decay_t,
        scale=scale,
        initial_state=None if state is None else state.float(),
        output_final_state=True,
    )
    return o, new_state.float()


# ---------------------------------------------------------------------------------------------
# Liger-style conversion of a softmax layer's own projections
# ---------------------------------------------------------------------------------------------


def liger_feature_map(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """phi(x) = softmax over the head dimension (Liger's feature map for q and k), returned in `dtype`.

    torch's softmax accumulates bf16/fp16 input in fp32, so a bf16 result is the fp32 softmax rounded once, without
    the fp32 copy (and the fp32 tensor autograd would keep for backward)."""
    return torch.softmax(x.to(dtype), dim=-1)


def liger_log_decay(k_raw: torch.Tensor, normalizer: float = 16.0) -> torch.Tensor:
    """Per-key-dim log forget gate from the raw key: logsigmoid(k) / normalizer, fp32, in (-inf, 0)."""
    return F.logsigmoid(k_raw.float()) / normalizer


def liger_gla_inputs(
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    v: torch.Tensor,
    *,
    num_kv_groups: int,
    normalizer: float = 16.0,
    feature_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head-first pre-RoPE projections -> GLA inputs (phi(q), phi(k), v, log_decay) in [B, T, H, D].

    q_pre [B, H, T, D], k_pre and v [B, Hkv, T, D] as transformers' attention interface passes them. phi(q), phi(k)
    and v come in `feature_dtype` (fp32 for the naive path; v's dtype for fla, as Liger does), the log-decay in fp32.
    phi(k) and the decay are computed on the kv heads and then repeated to H heads the way transformers'
    `repeat_kv` does (query head h reads kv head h // groups): the same values as computing on repeated keys, at
    1/groups of the cost. Shared by prefill (`liger_linear_attention`) and decode (`gla_step` with a cached state).
    """

    def to_query_heads(x):  # [B, Hkv, T, D] -> [B, T, H, D]
        return x.repeat_interleave(num_kv_groups, dim=1).transpose(1, 2)

    q_feat = liger_feature_map(q_pre, feature_dtype).transpose(1, 2)  # [B, T, H, D]
    k_feat = to_query_heads(liger_feature_map(k_pre, feature_dtype))
    log_decay = to_query_heads(liger_log_decay(k_pre, normalizer))
    return q_feat, k_feat, to_query_heads(v.to(feature_dtype)), log_decay


def liger_linear_attention(
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    v: torch.Tensor,
    *,
    num_kv_groups: int,
    backend: str = "auto",
    normalizer: float = 16.0,
) -> torch.Tensor:
    """Liger GLA on a layer's own projections: q_pre [B, H, T, D], k_pre/v [B, Hkv, T, D] (head-first).

    Returns [B, T, H, Dv] in v's dtype, the layout transformers' attention functions return.
    """
    o, _ = _liger_gla(q_pre, k_pre, v, None, False, num_kv_groups=num_kv_groups, backend=backend,
                      normalizer=normalizer)
    return o


def liger_linear_attention_with_state(
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    *,
    num_kv_groups: int,
    backend: str = "auto",
    normalizer: float = 16.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`liger_linear_attention` that starts from a recurrent state and returns the next one, for generation.

    state: [B, H, D, Dv] fp32 or None (an empty cache). A single token (decode) takes one recurrent step
    (`gla_step`, or fla `fused_recurrent_gla` on CUDA); longer inputs (prefill) take the chunked path.
    Returns (o [B, T, H, Dv] in v's dtype, new_state [B, H, D, Dv] fp32).
    """
    return _liger_gla(q_pre, k_pre, v, state, True, num_kv_groups=num_kv_groups, backend=backend,
                      normalizer=normalizer)


def _liger_gla(q_pre, k_pre, v, state, output_final_state, *, num_kv_groups, backend, normalizer):
    backend = _resolve_backend(backend, v.is_cuda)
    # fla: as Liger does, feature maps in v's dtype (bf16 in training), the log-decay fp32; the kernels accumulate
    # in fp32 either way. The naive path stays fp32 throughout.
    q_feat, k_feat, v_rep, log_decay = liger_gla_inputs(
        q_pre, k_pre, v, num_kv_groups=num_kv_groups, normalizer=normalizer,
        feature_dtype=v.dtype if backend == "fla" else torch.float32,
    )
    if output_final_state and q_feat.shape[1] == 1:
        o, new_state = gated_linear_attention_step(q_feat, k_feat, v_rep, log_decay, state, 1.0, backend)
    else:
        o, new_state = gated_linear_attention(q_feat, k_feat, v_rep, log_decay, scale=1.0, initial_state=state,
                                              output_final_state=output_final_state, backend=backend)
    return o.to(v.dtype), (None if new_state is None else new_state.float())


# ---------------------------------------------------------------------------------------------
# backend comparison, for GPU tests and benchmarks
# ---------------------------------------------------------------------------------------------

_BACKEND_FNS = {
    "recurrent": gla_recurrent_reference,
    "naive": functools.partial(gated_linear_attention, backend="naive"),
    "fla": functools.partial(gated_linear_attention, backend="fla"),
}


def compare_backends(
    batch: int,
    seq_len: int,
    heads: int,
    head_dim: int,
    value_dim: int | None = None,
    *,
    backend: str = "fla",
    reference: str = "naive",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    with_initial_state: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Max abs difference between two backends ("recurrent", "naive", "fla") in forward and gradients.

    Inputs are fla-test-like (randn q/k/v, g = logsigmoid(randn), scale = D^-0.5) in `dtype`; the
    reference runs on the same rounded inputs upcast to fp32. For each of o, final_state, dq, dk, dv, dg,
    dh0: `<key>` max abs error, `<key>_ref_max` max abs of the reference, `<key>_rmse_ratio`
    rms(error) / rms(reference) (the metric fla's own kernel tests bound, at 0.004-0.005).
    """
    value_dim = value_dim or head_dim
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k = randn(batch, seq_len, heads, head_dim), randn(batch, seq_len, heads, head_dim)
    v = randn(batch, seq_len, heads, value_dim)
    g = F.logsigmoid(randn(batch, seq_len, heads, head_dim).float())
    h0 = randn(batch, heads, head_dim, value_dim).float() if with_initial_state else None
    do = randn(batch, seq_len, heads, value_dim)
    dht = randn(batch, heads, head_dim, value_dim).float()
    names = ("dq", "dk", "dv", "dg") + (("dh0",) if with_initial_state else ())

    def run(name: str, upcast: bool):
        leaves = [x.detach().clone() for x in (q, k, v, g)] + ([h0.detach().clone()] if with_initial_state else [])
        if upcast:
            leaves = [x.float() for x in leaves]
        for x in leaves:
            x.requires_grad_(True)
        o, ht = _BACKEND_FNS[name](
            *leaves[:4],
            scale=head_dim**-0.5,
            initial_state=leaves[4] if with_initial_state else None,
            output_final_state=True,
        )
        ((o * do.to(o.dtype)).sum() + (ht * dht).sum()).backward()
        return {"o": o.detach().float(), "final_state": ht.detach().float()} | {
            n: x.grad.float() for n, x in zip(names, leaves)
        }

    ref = run(reference, upcast=True)
    out = run(backend, upcast=False)
    result = {}
    for key, value in ref.items():
        error = out[key] - value
        result[key] = error.abs().max().item()
        result[f"{key}_ref_max"] = value.abs().max().item()
        result[f"{key}_rmse_ratio"] = (error.square().mean().sqrt() / value.square().mean().sqrt()).item()
    return result
