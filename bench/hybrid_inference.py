"""P3/P4: a hybrid keeping 1/4 of its layers as full attention against the all-softmax model, same weights:
prefill time (target >= 2.0x at 128K), decode tokens/s with the hybrid cache (target >= 3x at 128K), and the bytes
of the generation cache (target <= 0.26 at 128K).

Both models are the same random-weight model under flashmorph.model.hybrid.apply_hybrid_layout: "softmax" has every
layer full, "hybrid" keeps --budget of the layers full (evenly spaced, from layer 0) and makes the rest linear
(fla chunk_gla for prefill, fused_recurrent_gla for decode). Which layers are full does not change the cost.
  prefill: one forward of the prompt with use_cache=True and logits for the last token only; a fresh cache per call.
  decode:  the cache is first filled to the context length with random K/V (full layers) and random states
           (linear layers) — decode cost does not depend on their values, and this skips a prefill per
           measurement — then --decode-tokens greedy steps are timed as one region, at each of --decode-batches
           (a layout whose cache does not fit records "oom": at 128K x8 the softmax cache alone is 128 GiB for 8B).
  bytes:   flashmorph.model.hybrid_cache.cache_nbytes of the cache after a prefill (else of the filled cache).

    python -m bench.hybrid_inference --shape llama3-8b --prefill-lengths 8K,32K,64K,128K --decode-lengths 32K,128K \
        --decode-batches 1,8
"""

from __future__ import annotations

import inspect

import torch

from bench.common import (Ratio, base_parser, build_lm, format_bytes, format_length, measure_peak, median,
                          parse_lengths, ratio, read_peak, reset_peak, run_or_oom, start, synchronize, time_call)
from flashmorph.model.config import MorphConfig
from flashmorph.model.hybrid import apply_hybrid_layout, make_hybrid_cache
from flashmorph.model.hybrid_cache import RecurrentStateLayer, cache_nbytes
from flashmorph.model.shape import ModelShape
from flashmorph.selection.baselines import periodic_indices
from flashmorph.selection.discretize import resolve_budget

TARGET_LENGTH = 131072  # the targets are stated at 128K; other lengths are reported without one
TARGETS = {"prefill": ">= 2.0", "decode": ">= 3.0", "bytes": "<= 0.26"}
LAYOUTS = ("softmax", "hybrid")
TITLE = "P3/P4: hybrid (1/4 full attention) vs all-softmax, same weights"


def layer_layouts(num_layers: int, budget: float) -> dict[str, list[str]]:
    """{"softmax": every layer full, "hybrid": `budget` of the layers full, evenly spaced from layer 0}."""
    kept = set(periodic_indices(num_layers, resolve_budget(budget, num_layers), "keep_first"))
    return {"softmax": ["full"] * num_layers,
            "hybrid": ["full" if i in kept else "linear" for i in range(num_layers)]}


def cache_kwarg(lm) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the GPU image's 5.17 has the old name)
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


@torch.no_grad()
def prefill(lm, input_ids: torch.Tensor):
    """The prompt's forward pass; returns the generation cache it filled."""
    return cache_of(lm(input_ids=input_ids, use_cache=True, logits_to_keep=1))


@torch.no_grad()
def filled_cache(lm, batch: int, length: int, seed: int = 0):
    """A cache of `lm`'s current layout holding `length` tokens: random K/V in full layers, random fp32 states
    [B, H, D, D] in linear layers."""
    config = lm.config
    param = next(lm.parameters())
    shape = ModelShape.from_config(config)
    kv_heads, heads, head_dim = shape.num_kv_heads, shape.num_heads, shape.head_dim
    gen = torch.Generator(device=param.device).manual_seed(seed)
    cache = make_hybrid_cache(lm)
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, RecurrentStateLayer):
            empty = param.new_empty(batch, kv_heads, 0, head_dim)  # initialises the layer, counts no token
            layer.update(empty, empty)
            layer.num_tokens = length
            layer.state = 0.02 * torch.randn(batch, heads, head_dim, head_dim, generator=gen, device=param.device)
        else:
            keys, values = (torch.randn(batch, kv_heads, length, head_dim, generator=gen, device=param.device,
                                        dtype=param.dtype) for _ in range(2))  # [B, Hkv, T, D]
            cache.update(keys, values, idx)
    return cache


@torch.no_grad()
def decode_seconds(lm, cache, batch: int, tokens: int, warmup: int, device) -> float:
    """Seconds for `tokens` greedy decode steps from `cache`, after `warmup` untimed steps."""
    kwarg = cache_kwarg(lm)
    ids = torch.full((batch, 1), 3, dtype=torch.long, device=device)

    def steps(count: int) -> None:
        nonlocal ids
        for _ in range(count):
            logits = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits
            ids = logits[:, -1:].argmax(-1)  # [B, 1]

    steps(warmup)
    synchronize(device)
    return time_call(lambda: steps(tokens), device, warmup=0, iters=1)[0]


def _prefill_row(lm, layouts, length: int, args, device) -> dict:
    ids = torch.randint(3, lm.config.vocab_size, (1, length), device=device)  # cost does not depend on the ids
    row: dict = {"kind": "prefill", "length": length, "batch": 1}
    for name in LAYOUTS:
        apply_hybrid_layout(lm, layouts[name], MorphConfig())

        def measure():
            last = []  # the latest call's cache; dropped before the next call, so peaks hold one cache

            def call():
                last.clear()
                last.append(prefill(lm, ids))

            for _ in range(args.warmup):
                call()
            reset_peak(device)
            seconds = median(time_call(call, device, warmup=0, iters=args.iters))
            peak, cache_bytes = read_peak(device), cache_nbytes(last[0])
            last.clear()
            return seconds, peak, cache_bytes

        measured = run_or_oom(measure, device)
        row[f"{name}_s"], row[f"{name}_peak_bytes"], row[f"{name}_cache_bytes"] = (
            measured if isinstance(measured, tuple) else (measured,) * 3)
    return row


def _decode_row(lm, layouts, length: int, batch: int, args, device) -> dict:
    row: dict = {"kind": "decode", "length": length, "batch": batch, "tokens": args.decode_tokens}
    for name in LAYOUTS:
        apply_hybrid_layout(lm, layouts[name], MorphConfig())

        def measure():
            cache = filled_cache(lm, batch, length, args.seed)
            cache_bytes = cache_nbytes(cache)
            seconds, peak = measure_peak(
                lambda: decode_seconds(lm, cache, batch, args.decode_tokens, args.warmup_tokens, device), device)
            return batch * args.decode_tokens / seconds, peak, cache_bytes

        measured = run_or_oom(measure, device)
        row[f"{name}_tokens_per_s"], row[f"{name}_peak_bytes"], row[f"{name}_cache_bytes"] = (
            measured if isinstance(measured, tuple) else (measured,) * 3)
    return row


def _target(kind: str, length: int) -> str:
    return TARGETS[kind] if length == TARGET_LENGTH else ""


def table(rows: list[dict]) -> list[Ratio]:
    ratios = []
    for row in rows:
        at = f"@{format_length(row['length'])} x{row['batch']}"
        if row["kind"] == "prefill":
            soft, hyb = row["softmax_s"], row["hybrid_s"]
            peaks = f"; peak {format_bytes(row['softmax_peak_bytes'])} vs {format_bytes(row['hybrid_peak_bytes'])}"
            detail = (f"{soft:.3f} s / {hyb:.3f} s" if isinstance(soft, float) and isinstance(hyb, float)
                      else f"{soft} / {hyb}")
            ratios.append(Ratio(f"P3 prefill {at}: softmax time / hybrid time", ratio(soft, hyb),
                                _target("prefill", row["length"]), detail + peaks))
        else:
            soft, hyb = row["softmax_tokens_per_s"], row["hybrid_tokens_per_s"]
            detail = (f"{hyb:.1f} / {soft:.1f} tokens/s" if isinstance(soft, float) and isinstance(hyb, float)
                      else f"{hyb} / {soft}")
            ratios.append(Ratio(f"P4 decode {at}: hybrid tokens/s / softmax tokens/s", ratio(hyb, soft),
                                _target("decode", row["length"]), detail))
    # cache bytes once per (length, batch): after a prefill where there was one, else of the filled decode cache
    seen = set()
    for row in sorted(rows, key=lambda r: r["kind"] != "prefill"):
        key = (row["length"], row["batch"])
        if key in seen:
            continue
        seen.add(key)
        soft, hyb = row["softmax_cache_bytes"], row["hybrid_cache_bytes"]
        ratios.append(Ratio(f"P4 cache bytes @{format_length(row['length'])} x{row['batch']}: hybrid / softmax",
                            ratio(hyb, soft), _target("bytes", row["length"]),
                            f"{format_bytes(hyb)} / {format_bytes(soft)} ({row['kind']})"))
    return ratios


def main(argv: list[str] | None = None) -> list[Ratio]:
    parser = base_parser(__doc__, default_shape="llama3-8b")
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of layers kept as full attention")
    parser.add_argument("--prefill-lengths", type=parse_lengths, default=parse_lengths("8K,32K,64K,128K"),
                        help="prompt lengths to time ('' skips prefill)")
    parser.add_argument("--decode-lengths", type=parse_lengths, default=parse_lengths("32K,128K"),
                        help="context lengths to decode at ('' skips decode)")
    parser.add_argument("--decode-batches", type=lambda text: [int(b) for b in text.split(",") if b], default=[1],
                        help="batch sizes to decode at, e.g. 1,8 (a layout that does not fit records oom)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps")
    parser.add_argument("--warmup-tokens", type=int, default=4, help="untimed decode steps first")
    parser.set_defaults(iters=2)
    args, device, dtype, results = start(parser, argv, "hybrid_inference", TITLE, prefill_lengths=[64, 128],
                                         decode_lengths=[64], decode_tokens=4, warmup_tokens=1)

    lm = build_lm(args.shape, device, dtype, seed=args.seed)
    layouts = layer_layouts(lm.config.num_hidden_layers, args.budget)
    results.data["layouts"] = layouts
    # decode first: cheap, and it carries P4's target; then prefill from short to long
    for length in args.decode_lengths:
        for batch in args.decode_batches:
            results.add_row(**_decode_row(lm, layouts, length, batch, args, device))
            results.set_ratios(table(results.rows))
    for length in args.prefill_lengths:
        results.add_row(**_prefill_row(lm, layouts, length, args, device))
        results.set_ratios(table(results.rows))
    full = layouts["hybrid"].count("full")
    notes = [f"shape {args.shape}; hybrid keeps {full} of {len(layouts['hybrid'])} layers full "
             f"{[i for i, m in enumerate(layouts['hybrid']) if m == 'full']}",
             f"prefill: median of {args.iters} after {args.warmup} warm-up per layout and length; decode: "
             f"{args.decode_tokens} steps after {args.warmup_tokens} warm-up steps, from a filled cache"]
    return results.finish(table(results.rows), notes)


if __name__ == "__main__":
    main()
