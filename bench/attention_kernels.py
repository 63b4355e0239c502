"""Kernel table: one attention layer's token mixing at 4K-128K tokens, forward and forward+backward, through
  fla:   the linear branch on fla's chunk_gla (flashmorph.model.ops.liger, backend "fla"),
  naive: the same branch on flashmorph's chunked torch path (backend "naive": the CPU path and the tests' reference),
  sdpa:  softmax attention as the model runs it (transformers' sdpa_attention_forward, causal, GQA).
The linear branch includes its Liger feature maps and forget gate. Shapes default to one Llama-3-8B layer (32 query
heads, 8 kv heads, head dim 128, batch 1). The naive path needs O(T·64·D) memory per head, so it runs only up to
--naive-max-len. Where fla and naive both run, their outputs are compared (relative L2 error in the table).

    python -m bench.attention_kernels --lengths 4K,8K,16K,32K,64K,128K --naive-max-len 16K --out runs/bench
"""

from __future__ import annotations

import torch
from torch import nn

from bench.common import (OOM, Ratio, base_parser, format_bytes, format_length, median, parse_length, parse_lengths,
                          ratio, read_peak, reset_peak, run_or_oom, start, time_call)
from flashmorph.model.ops.liger import liger_linear_attention

BACKENDS = ("fla", "naive", "sdpa")
PASSES = ("fwd", "fwd+bwd")
TITLE = "Kernels: linear branch (fla, naive torch) vs softmax (SDPA)"


class _SoftmaxModule(nn.Module):
    """What sdpa_attention_forward reads from an attention module."""

    def __init__(self, num_kv_groups: int):
        super().__init__()
        self.num_key_value_groups = num_kv_groups
        self.is_causal = True


def attention_fn(backend: str, num_kv_groups: int):
    """fn(q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]) -> [B, T, H, D], as the morph attention calls it."""
    if backend == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        module = _SoftmaxModule(num_kv_groups)
        return lambda q, k, v: sdpa_attention_forward(module, q, k, v, None)[0]
    return lambda q, k, v: liger_linear_attention(q, k, v, num_kv_groups=num_kv_groups, backend=backend)


def make_inputs(args, length: int, device, dtype, requires_grad: bool):
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q_shape = (args.batch, args.heads, length, args.head_dim)  # [B, H, T, D]
    kv_shape = (args.batch, args.kv_heads, length, args.head_dim)  # [B, Hkv, T, D]
    shapes = [q_shape, kv_shape, kv_shape]
    return [torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(requires_grad)
            for shape in shapes]


def measure(backend: str, pass_name: str, args, length: int, device, dtype) -> dict:
    """{"seconds", "peak_bytes", "out"}: median time of one call (after warm-up), its peak, and a forward output."""
    fn = attention_fn(backend, args.heads // args.kv_heads)
    backward = pass_name == "fwd+bwd"
    q, k, v = make_inputs(args, length, device, dtype, requires_grad=backward)
    grad = torch.randn(args.batch, length, args.heads, args.head_dim, device=device, dtype=dtype)  # [B, T, H, D]

    def call():
        if backward:
            fn(q, k, v).backward(grad)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)

    for _ in range(args.warmup):
        call()
    reset_peak(device)
    seconds = median(time_call(call, device, warmup=0, iters=args.iters))
    peak = read_peak(device)
    out = None
    if not backward:
        with torch.no_grad():
            out = fn(q, k, v).float()
    return {"seconds": seconds, "peak_bytes": peak, "out": out}


def available_backends(device) -> list[str]:
    # fla's Triton kernels need CUDA; on CPU the table compares the naive path with SDPA only
    return list(BACKENDS) if device.type == "cuda" else ["naive", "sdpa"]


def row_ratios(row: dict, backends: list[str]) -> list[Ratio]:
    """sdpa ÷ the fastest linear path (fla on CUDA, naive on CPU), then naive ÷ fla where fla ran."""
    at = f"{row['pass']} @{format_length(row['length'])}"
    times = ", ".join(f"{b} {_ms(row.get(f'{b}_s'))}" for b in BACKENDS)
    peaks = ", ".join(f"{b} {format_bytes(row.get(f'{b}_peak_bytes'))}" for b in backends)
    err = f"; fla vs naive rel err {row['fla_vs_naive_rel_err']:.1e}" if "fla_vs_naive_rel_err" in row else ""
    fast = "fla" if "fla" in backends else "naive"
    lines = [Ratio(f"kernels {at}: sdpa time / {fast} time", ratio(row.get("sdpa_s"), row.get(f"{fast}_s")), "",
                   f"{times}; peak {peaks}{err}")]
    if fast == "fla":
        skipped = "naive skipped above --naive-max-len" if row.get("naive_s") is None else ""
        lines.append(Ratio(f"kernels {at}: naive time / fla time", ratio(row.get("naive_s"), row.get("fla_s")), "",
                           skipped))
    return lines


def _ms(value) -> str:
    return f"{value * 1e3:.2f} ms" if isinstance(value, float) else ("-" if value is None else str(value))


def main(argv: list[str] | None = None) -> list[Ratio]:
    parser = base_parser(__doc__, default_shape="llama3-8b")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4K,8K,16K,32K,64K,128K"))
    parser.add_argument("--naive-max-len", type=parse_length, default=parse_length("16K"),
                        help="longest length the naive torch path runs at")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args, device, dtype, results = start(parser, argv, "attention_kernels", TITLE, lengths=[64, 128],
                                         naive_max_len=128, heads=4, kv_heads=2, head_dim=16)
    passes = [p for p in args.passes.split(",") if p]
    unknown = sorted(set(passes) - set(PASSES))
    if unknown or args.heads % args.kv_heads:
        raise SystemExit(f"error: --passes {unknown} unknown (use {PASSES}) or --heads not a multiple of --kv-heads")
    backends = available_backends(device)

    ratios = []
    for pass_name in passes:
        for length in args.lengths:
            row = {"pass": pass_name, "length": length}
            outputs = {}
            for backend in backends:
                if backend == "naive" and length > args.naive_max_len:
                    row[f"{backend}_s"] = row[f"{backend}_peak_bytes"] = None  # skipped: see --naive-max-len
                    continue
                measured = run_or_oom(lambda: measure(backend, pass_name, args, length, device, dtype), device)
                if measured == OOM:
                    row[f"{backend}_s"] = row[f"{backend}_peak_bytes"] = OOM
                    continue
                row[f"{backend}_s"], row[f"{backend}_peak_bytes"] = measured["seconds"], measured["peak_bytes"]
                outputs[backend] = measured["out"]
            if outputs.get("fla") is not None and outputs.get("naive") is not None:
                row["fla_vs_naive_rel_err"] = ((outputs["fla"] - outputs["naive"]).norm()
                                               / outputs["naive"].norm()).item()
            del outputs
            results.add_row(**row)
            ratios += row_ratios(row, backends)
            results.set_ratios(ratios)
    notes = [f"one layer: batch {args.batch}, {args.heads} query heads, {args.kv_heads} kv heads, head dim "
             f"{args.head_dim}, {str(dtype).removeprefix('torch.')}; median of {args.iters} after {args.warmup} "
             "warm-up call(s)"]
    if "fla" not in backends:
        notes.append("fla needs CUDA: on CPU the table compares the naive torch path with SDPA")
    return results.finish(ratios, notes)


if __name__ == "__main__":
    main()
