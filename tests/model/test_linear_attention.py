"""GLA ops: the chunked path and the decode step against the recurrent reference, Liger inputs, fla agreement."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flashmorph.errors import FlashMorphError
from flashmorph.model.linear_attention import (
    compare_backends,
    gated_linear_attention,
    gla_chunked,
    gla_recurrent_reference,
    gla_step,
    liger_gla_inputs,
    liger_linear_attention,
)

# fp64: the chunked and recurrent forms are the same algebra, so they agree to rounding
ATOL_FP64 = 1e-10
# fp32: both accumulate in fp32 in different orders; values and grads here are O(1..10)
ATOL_FP32, RTOL_FP32 = 1e-4, 1e-4


def make_inputs(batch=2, seq_len=37, heads=2, key_dim=8, value_dim=6, dtype=torch.float64, seed=0,
                decay=None, with_initial_state=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k = randn(batch, seq_len, heads, key_dim), randn(batch, seq_len, heads, key_dim)
    v = randn(batch, seq_len, heads, value_dim)
    if decay is None:
        log_decay = F.logsigmoid(randn(batch, seq_len, heads, key_dim))
    else:  # around a fixed per-step log decay, +-10 %
        log_decay = decay * (1 + 0.1 * torch.rand(batch, seq_len, heads, key_dim, generator=gen, dtype=dtype))
    initial_state = randn(batch, heads, key_dim, value_dim) if with_initial_state else None
    return q, k, v, log_decay, initial_state


def run_with_grads(fn, q, k, v, log_decay, initial_state, seed=1, **kwargs):
    """Forward + backward through o and the final state; returns (o, state, grads of all inputs)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, log_decay)]
    h0 = None if initial_state is None else initial_state.detach().clone().requires_grad_(True)
    o, state = fn(*leaves, initial_state=h0, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    d_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    d_state = torch.randn(state.shape, generator=gen, dtype=state.dtype)
    ((o * d_o).sum() + (state * d_state).sum()).backward()
    grads = [x.grad for x in leaves] + ([] if h0 is None else [h0.grad])
    return o.detach(), state.detach(), grads


def assert_all_close(actual, expected, **tol):
    o, state, grads = actual
    o_ref, state_ref, grads_ref = expected
    torch.testing.assert_close(o, o_ref, **tol)
    torch.testing.assert_close(state, state_ref, **tol)
    assert len(grads) == len(grads_ref)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("seq_len,chunk_size", [(64, 16), (50, 16), (37, 8), (5, 64), (1, 4), (33, 32)])
def test_chunked_matches_recurrent_fp64(seq_len, chunk_size, with_initial_state):
    inputs = make_inputs(seq_len=seq_len, with_initial_state=with_initial_state)
    expected = run_with_grads(gla_recurrent_reference, *inputs, scale=0.7)
    actual = run_with_grads(gla_chunked, *inputs, scale=0.7, chunk_size=chunk_size)
    assert_all_close(actual, expected, atol=ATOL_FP64, rtol=0)


def test_chunked_matches_recurrent_fp32():
    inputs = make_inputs(seq_len=70, dtype=torch.float32)
    expected = run_with_grads(gla_recurrent_reference, *inputs)
    actual = run_with_grads(gla_chunked, *inputs, chunk_size=32)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.float32
    assert_all_close(actual, expected, atol=ATOL_FP32, rtol=RTOL_FP32)


@pytest.mark.parametrize("decay", [-20.0, -1e-4, -500.0])
def test_chunked_is_stable_at_extreme_decays(decay):
    # -20 per step: exp over a 32-chunk spans e^-640, far past fp32's range; -500 underflows exp to 0
    inputs = make_inputs(seq_len=45, dtype=torch.float32, decay=decay)
    actual = run_with_grads(gla_chunked, *inputs, chunk_size=32)
    for t in (actual[0], actual[1], *actual[2]):
        assert torch.isfinite(t).all()
    expected = run_with_grads(gla_recurrent_reference, *inputs)
    assert_all_close(actual, expected, atol=ATOL_FP32, rtol=RTOL_FP32)


def test_gla_step_iterated_equals_reference():
    q, k, v, log_decay, h0 = make_inputs(seq_len=13)
    o_ref, state_ref = gla_recurrent_reference(q, k, v, log_decay, 0.5, h0, output_final_state=True)
    state, outputs = h0, []
    for t in range(q.shape[1]):
        step = slice(t, t + 1)
        o_t, state = gla_step(q[:, step], k[:, step], v[:, step], log_decay[:, step], state, scale=0.5)
        assert o_t.shape == (2, 1, 2, 6)
        outputs.append(o_t)
    torch.testing.assert_close(torch.cat(outputs, dim=1), o_ref, atol=ATOL_FP64, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=ATOL_FP64, rtol=0)
    # no state yet (the first token of a generation) is the same as a zero state
    o_first, _ = gla_step(q[:, :1], k[:, :1], v[:, :1], log_decay[:, :1], None)
    o_zero, _ = gla_step(q[:, :1], k[:, :1], v[:, :1], log_decay[:, :1], torch.zeros_like(h0))
    torch.testing.assert_close(o_first, o_zero)


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


def load_fla_naive():
    """fla's own naive reference, loaded from its file: `import fla` costs seconds and warns on CPU."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "ops", "gla", "naive.py")
    if not os.path.exists(path):
        pytest.skip("this fla has no fla/ops/gla/naive.py")
    module_spec = importlib.util.spec_from_file_location("_fla_gla_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.naive_recurrent_gla


def test_reference_agrees_with_fla_naive_recurrent_gla():
    # ties our semantics (layout [B, T, H, D], state [B, H, D, Dv], g = log decay) to fla's kernels';
    # fla's naive reference fixes scale = D^-0.5 and runs in fp32
    naive_recurrent_gla = load_fla_naive()
    q, k, v, log_decay, h0 = make_inputs(seq_len=19, dtype=torch.float32)
    o_fla, state_fla = naive_recurrent_gla(q, k, v, log_decay, initial_state=h0, output_final_state=True)
    o, state = gla_recurrent_reference(q, k, v, log_decay, q.shape[-1] ** -0.5, h0, output_final_state=True)
    torch.testing.assert_close(o, o_fla, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_fla, atol=1e-5, rtol=1e-5)


def test_compare_backends_helper_on_cpu():
    errors = compare_backends(2, 40, 2, 8, 16, backend="naive", reference="recurrent",
                              dtype=torch.float32, device="cpu")
    for key in ("o", "final_state", "dq", "dk", "dv", "dg", "dh0"):
        assert errors[key] <= 1e-5 * max(1.0, errors[f"{key}_ref_max"]), (key, errors)
        assert errors[f"{key}_rmse_ratio"] <= 1e-6, (key, errors)


def test_backend_dispatch_on_cpu():
    q, k, v, log_decay, h0 = make_inputs(seq_len=9)
    o_auto, _ = gated_linear_attention(q, k, v, log_decay, initial_state=h0, backend="auto")
    o_naive, _ = gla_chunked(q, k, v, log_decay, initial_state=h0)
    torch.testing.assert_close(o_auto, o_naive, atol=0, rtol=0)
    with pytest.raises(FlashMorphError, match="linear_backend=fla needs CUDA"):
        gated_linear_attention(q, k, v, log_decay, backend="fla")
    with pytest.raises(FlashMorphError, match="linear_backend='triton' is unknown"):
        gated_linear_attention(q, k, v, log_decay, backend="triton")
    with pytest.raises(FlashMorphError, match="linear_backend=fla needs CUDA"):
        liger_linear_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), num_kv_groups=1, backend="fla")


def test_module_import_does_not_import_fla():
    code = "import sys, flashmorph.model.linear_attention; sys.exit('fla' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need a CUDA GPU")


def rmse_ratio(actual, expected):
    return ((actual - expected).square().mean().sqrt() / expected.square().mean().sqrt()).item()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [64, 300])
def test_fla_matches_naive(dtype, seq_len):
    # fla's dots run in tf32/bf16 with fp32 accumulation; bound rms(err)/rms(ref) as fla's tests do (0.005 there)
    errors = compare_backends(2, seq_len, 4, 64, 64, backend="fla", reference="naive", dtype=dtype, device="cuda")
    for key in ("o", "final_state", "dq", "dk", "dv", "dg", "dh0"):
        assert errors[f"{key}_rmse_ratio"] <= 1e-2, (key, errors)


@cuda
def test_liger_fla_matches_naive():
    gen = torch.Generator().manual_seed(5)
    q_pre = torch.randn(2, 8, 200, 64, generator=gen).cuda().bfloat16()
    k_pre = torch.randn(2, 2, 200, 64, generator=gen).cuda().bfloat16()
    v = torch.randn(2, 2, 200, 64, generator=gen).cuda().bfloat16()
    o_fla = liger_linear_attention(q_pre, k_pre, v, num_kv_groups=4, backend="fla")
    o_naive = liger_linear_attention(q_pre, k_pre, v, num_kv_groups=4, backend="naive")
    assert o_fla.dtype == torch.bfloat16 and o_fla.shape == (2, 200, 8, 64)
    assert rmse_ratio(o_fla.float(), o_naive.float()) <= 1e-2
