"""Where the time goes when a target is missed: torch-profiler tables of one hybrid prefill and of decode steps.

    python -m bench.profile_step --shape llama3-8b --prefill-length 128K --decode-length 32K --out DIR
    python -m bench.profile_step --smoke --out DIR        (CPU, tiny shape, seconds)

Prints, for each measured call, the wall time, the time the GPU was busy (sum of kernel times) and the top kernels
by GPU time; a wall time far above the busy time means the call is bound by Python/launch overhead, not the GPU.
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import base_parser, build_lm, environment, parse_length, resolve_device, smoke_defaults, synchronize
from bench.hybrid_inference import cache_kwarg, filled_cache, layer_layouts, prefill
from flashmorph.model.config import MorphConfig
from flashmorph.model.hybrid import apply_hybrid_layout

TOP = 12


def _profiled(fn, device) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    use_cuda = device.type == "cuda"

    def device_us(e):
        return getattr(e, "self_device_time_total", 0) if use_cuda else e.self_cpu_time_total

    busy = sum(device_us(e) for e in events if not use_cuda or e.device_type.name == "CUDA") / 1e6
    top = sorted(events, key=device_us, reverse=True)[:TOP]
    return {"wall_s": wall, "busy_s": busy if use_cuda else None,
            "top": [{"name": e.key[:90], "calls": e.count, "seconds": device_us(e) / 1e6} for e in top]}


def _print(title: str, result: dict) -> None:
    busy = result["busy_s"]
    print(f"\n### {title}: wall {result['wall_s']:.3f} s" +
          (f", GPU busy {busy:.3f} s ({100 * busy / result['wall_s']:.0f}% of wall)" if busy is not None else ""))
    for row in result["top"]:
        print(f"  {row['seconds']:9.4f} s  x{row['calls']:<6d} {row['name']}")


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "llama3-8b")
    parser.add_argument("--prefill-length", default="128K", help="hybrid prefill length to profile")
    parser.add_argument("--decode-length", default="32K", help="cache length of the decode steps")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per profile")
    parser.add_argument("--budget", type=float, default=0.25, help="full-attention fraction of the hybrid")
    args = parser.parse_args(argv)
    if args.smoke:
        args = smoke_defaults(args, prefill_length="64", decode_length="64", decode_steps=2)
    device, dtype = resolve_device(args.device, args.smoke)
    lm = build_lm(args.shape, device, dtype, seed=args.seed)
    layouts = layer_layouts(lm.config.num_hidden_layers, args.budget)
    results = {"environment": environment(device, "bench.profile_step", sys.argv[1:] if argv is None else argv)}
    prefill_ids = torch.randint(3, lm.config.vocab_size, (1, parse_length(args.prefill_length)), device=device)
    for name in layouts:
        apply_hybrid_layout(lm, layouts[name], MorphConfig())
        with torch.no_grad():
            prefill(lm, prefill_ids)  # warm-up (fla autotuning)
            results[f"prefill_{name}"] = _profiled(lambda: prefill(lm, prefill_ids), device)
            cache = filled_cache(lm, 1, parse_length(args.decode_length), seed=args.seed)
            ids = torch.full((1, 1), 3, dtype=torch.long, device=device)
            kwarg = cache_kwarg(lm)

            def decode():
                for _ in range(args.decode_steps):
                    lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{kwarg: cache})

            decode()
            results[f"decode_{name}"] = _profiled(decode, device)
            del cache
        _print(f"prefill {args.prefill_length}, {name}", results[f"prefill_{name}"])
        _print(f"{args.decode_steps} decode steps at {args.decode_length}, {name}", results[f"decode_{name}"])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_step.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
