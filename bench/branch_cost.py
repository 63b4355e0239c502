"""P2: gate-search step time ÷ (softmax-only step + linear-only step, each measured alone): what running both
branches in one pass costs (target <= 1.10). Same model, same tokens, activation checkpointing on.

The three steps are bench/morph_steps.py's train_step with every layer mixed (gate search), softmax only, or linear
only; each is warmed up at each length before timing (fla autotunes at its first call), then the median of --iters
timed steps is taken. The softmax-only step is also the frozen model's own step, so the table gives the gate-search
overhead over it as well.

    python bench/branch_cost.py --shape llama3-8b --lengths 8K,32K --out runs/bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Ratio,
    Results,
    base_parser,
    format_length,
    median,
    parse_lengths,
    ratio,
    resolve_device,
    retrieval_batch,
    run_or_oom,
    smoke_defaults,
    time_call,
)
from bench.morph_steps import MODES, build_morphable, set_mode, train_step  # noqa: E402

TITLE = "P2: cost of running both branches in one step"
TARGET = "<= 1.10"


def _ms(value) -> str:
    return f"{value * 1e3:.1f} ms" if isinstance(value, float) else str(value)


def time_mode(model, batch, mode: str, device, warmup: int, iters: int) -> float:
    set_mode(model, mode)
    return median(time_call(lambda: train_step(model, batch), device, warmup, iters))


def main(argv: list[str] | None = None) -> list[Ratio]:
    parser = base_parser(__doc__, default_shape="llama3-8b")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("8K,32K"), help="tokens per sample")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing (default on, as gate search runs)")
    args = smoke_defaults(parser.parse_args(argv), lengths=[64, 128])
    device, dtype = resolve_device(args.device, args.smoke)
    results = Results("branch_cost", TITLE, args, device, "bench/branch_cost.py", argv)

    model = build_morphable(args.shape, device, dtype, checkpointing=args.checkpointing, seed=args.seed)
    vocab = model.lm.config.vocab_size
    ratios = []
    for length in args.lengths:
        batch = retrieval_batch(vocab, length, args.batch, device, seed=args.seed)
        seconds = {mode: run_or_oom(lambda: time_mode(model, batch, mode, device, args.warmup, args.iters), device)
                   for mode in MODES}
        mixed, full, linear = seconds["mixed"], seconds["full"], seconds["linear"]
        both_alone = full + linear if isinstance(full, float) and isinstance(linear, float) else None
        results.add_row(length=length, batch=args.batch, mixed_step_s=mixed, softmax_step_s=full,
                        linear_step_s=linear)
        over_frozen = ratio(mixed, full)
        over_text = "n/a" if over_frozen is None else f"{over_frozen:.2f}x"
        ratios.append(Ratio(
            f"P2 step time @{format_length(length)} x{args.batch}: gate search / (softmax alone + linear alone)",
            ratio(mixed, both_alone), TARGET,
            f"{_ms(mixed)} / ({_ms(full)} + {_ms(linear)}); gate search / softmax alone {over_text}"))
        results.set_ratios(ratios)
    notes = [f"shape {args.shape}, activation checkpointing {'on' if args.checkpointing else 'off'}, "
             f"median of {args.iters} steps after {args.warmup} warm-up step(s) per mode and length"]
    results.finish(ratios, notes)
    return ratios


if __name__ == "__main__":
    main()
