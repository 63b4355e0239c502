"""GLA ops (flashmorph/model/ops/gla): the chunked path and the decode step against the recurrent reference, the
reference against fla's own naive one, the backend dispatch, and fla's kernels against the naive paths on CUDA."""

import ast
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flashmorph
from flashmorph.errors import FlashMorphError
from flashmorph.model.ops.gla import (
    gated_linear_attention,
    gated_linear_attention_step,
    gla_chunked,
    gla_recurrent_reference,
    gla_step,
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


def test_module_import_does_not_import_fla():
    modules = ("flashmorph.model.ops.gla", "flashmorph.model.ops.gla.fla", "flashmorph.model.ops.liger",
               "flashmorph.model.morph")
    code = f"import sys, {', '.join(modules)}; sys.exit('fla' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_only_ops_gla_fla_imports_fla():
    # one file owns the fla dependency; the rest of the package reaches fla's kernels through the dispatch
    package = Path(flashmorph.__file__).parent
    importers = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(name == "fla" or name.startswith("fla.") for name in names):
                importers.append(path.relative_to(package).as_posix())
    assert sorted(set(importers)) == ["model/ops/gla/fla.py"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [64, 300])
def test_fla_matches_naive(dtype, seq_len):
    # fla's dots run in tf32/bf16 with fp32 accumulation; bound rms(err)/rms(ref) as fla's tests do (0.005 there)
    errors = compare_backends(2, seq_len, 4, 64, 64, backend="fla", reference="naive", dtype=dtype, device="cuda")
    for key in ("o", "final_state", "dq", "dk", "dv", "dg", "dh0"):
        assert errors[f"{key}_rmse_ratio"] <= 1e-2, (key, errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's fused_recurrent_gla needs CUDA")
def test_fused_recurrent_decode_step_matches_the_naive_step():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 1, 4, 64, generator=gen).softmax(-1) for _ in range(2))  # [B, 1, H, D]
    v = torch.randn(2, 1, 4, 64, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 1, 4, 64, generator=gen)) / 16
    state = torch.randn(2, 4, 64, 64, generator=gen)  # [B, H, D, Dv]
    expected_o, expected_state = gla_step(q, k, v, g, state)
    cuda = [x.cuda() for x in (q, k, v, g, state)]
    o, new_state = gated_linear_attention_step(*cuda, backend="fla")
    assert new_state.dtype == torch.float32
    torch.testing.assert_close(o.cpu(), expected_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_state.cpu(), expected_state, rtol=1e-4, atol=1e-4)
