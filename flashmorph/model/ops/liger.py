"""Liger's conversion of a softmax layer's own projections to GLA (no new weights): the softmax feature map, the
forget gate from the key, and the linear branch built from q/k/v on top of `ops.gla`'s dispatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashmorph.model.ops.gla import gated_linear_attention, gated_linear_attention_step, resolve_backend


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
    backend = resolve_backend(backend, v.is_cuda)
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
