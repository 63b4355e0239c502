"""Liger ops (flashmorph/model/ops/liger.py): the linear branch built from a layer's own q/k/v against the same
computation spelled out on the recurrent reference, prefill + decode against one prefill, and fla against naive."""

import pytest
import torch
import torch.nn.functional as F

from flashmorph.errors import FlashMorphError
from flashmorph.model.ops.gla import gated_linear_attention, gla_recurrent_reference, gla_step
from flashmorph.model.ops.liger import liger_gla_inputs, liger_linear_attention, liger_linear_attention_with_state


def liger_manual(q_pre, k_pre, v, num_kv_groups):
    """Liger GLA spelled out with explicit indices, on top of the recurrent reference."""
    kv_head = [h // num_kv_groups for h in range(q_pre.shape[1])]  # transformers' repeat_kv order
    k_rep, v_rep = k_pre[:, kv_head].double(), v[:, kv_head].double()  # [B, H, T, D]
    q_feat = torch.softmax(q_pre.double(), dim=-1)
    k_feat = torch.softmax(k_rep, dim=-1)
    log_decay = F.logsigmoid(k_rep) / 16
    to_bthd = lambda x: x.transpose(1, 2)  # noqa: E731
    o, _ = gla_recurrent_reference(*map(to_bthd, (q_feat, k_feat, v_rep, log_decay)), scale=1.0)
    return o  # [B, T, H, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_linear_attention_gqa_matches_manual(dtype):
    batch, heads, kv_heads, seq_len, head_dim = 2, 4, 2, 21, 8
    gen = torch.Generator().manual_seed(3)
    q_pre = torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(dtype)
    k_pre = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen).to(dtype)
    o = liger_linear_attention(q_pre, k_pre, v, num_kv_groups=heads // kv_heads, backend="auto")
    assert o.shape == (batch, seq_len, heads, head_dim) and o.dtype == dtype
    expected = liger_manual(q_pre, k_pre, v, heads // kv_heads)
    # bf16: only the final rounding of o (the computation is fp32 from the bf16 inputs)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(o.double(), expected, **tol)


def test_liger_decode_steps_continue_prefill():
    # what a generation cache does: chunked prefill state, then gla_step per token == one long prefill
    batch, heads, kv_heads, seq_len, head_dim, prefill = 1, 4, 2, 12, 8, 7
    gen = torch.Generator().manual_seed(4)
    q_pre = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    k_pre = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    full = liger_linear_attention(q_pre, k_pre, v, num_kv_groups=2, backend="naive")
    q, k, v_rep, log_decay = liger_gla_inputs(q_pre, k_pre, v, num_kv_groups=2)
    o_prefill, state = gated_linear_attention(
        q[:, :prefill], k[:, :prefill], v_rep[:, :prefill], log_decay[:, :prefill], output_final_state=True
    )
    outputs = [o_prefill]
    for t in range(prefill, seq_len):
        o_t, state = gla_step(q[:, t : t + 1], k[:, t : t + 1], v_rep[:, t : t + 1], log_decay[:, t : t + 1], state)
        outputs.append(o_t)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-6, rtol=1e-5)


def test_stateful_linear_attention_splits_anywhere():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 13, 8), torch.randn(2, 2, 13, 8)  # [B, H, T, D], [B, Hkv, T, D]
    v = torch.randn(2, 2, 13, 8)
    whole = liger_linear_attention(q, k, v, num_kv_groups=2, backend="naive")  # [B, T, H, D]
    state, pieces = None, []
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 13)):
        out, state = liger_linear_attention_with_state(
            q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, num_kv_groups=2, backend="naive")
        pieces.append(out)
    assert state.shape == (2, 4, 8, 8) and state.dtype == torch.float32
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-6)


def test_liger_backend_dispatch_on_cpu():
    q, k = torch.randn(2, 2, 9, 2, 8, dtype=torch.float64).unbind(0)  # [B, T, H, D] each
    with pytest.raises(FlashMorphError, match="linear_backend=fla needs CUDA"):
        liger_linear_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), num_kv_groups=1, backend="fla")


def rmse_ratio(actual, expected):
    return ((actual - expected).square().mean().sqrt() / expected.square().mean().sqrt()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need a CUDA GPU")
def test_liger_fla_matches_naive():
    gen = torch.Generator().manual_seed(5)
    q_pre = torch.randn(2, 8, 200, 64, generator=gen).cuda().bfloat16()
    k_pre = torch.randn(2, 2, 200, 64, generator=gen).cuda().bfloat16()
    v = torch.randn(2, 2, 200, 64, generator=gen).cuda().bfloat16()
    o_fla = liger_linear_attention(q_pre, k_pre, v, num_kv_groups=4, backend="fla")
    o_naive = liger_linear_attention(q_pre, k_pre, v, num_kv_groups=4, backend="naive")
    assert o_fla.dtype == torch.bfloat16 and o_fla.shape == (2, 200, 8, 64)
    assert rmse_ratio(o_fla.float(), o_naive.float()) <= 1e-2
