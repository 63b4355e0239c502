"""P2: gate-search step time ÷ (softmax-only step + linear-only step, each measured alone): what running both
branches in one pass costs (target <= 1.10). Same model, same tokens, activation checkpointing on.

The three steps are bench/morph_steps.py's train_step with every layer mixed (gate search), softmax only, or linear
only; each is warmed up at each length before timing (fla autotunes at its first call), then the median of --iters
timed steps is taken. The softmax-only step is also the frozen model's own step, so the table gives the gate-search
overhead over it as well.

    python -m bench.branch_cost --shape llama3-8b --lengths 8K,32K --out runs/bench
"""

from __future__ import annotations

from bench.common import Ratio, format_length, median, ratio, retrieval_batch, run_or_oom, start, time_call
from bench.morph_steps import MODES, build_morphable, set_mode, step_parser, train_step

TITLE = "P2: cost of running both branches in one step"
TARGET = "<= 1.10"


def _ms(value) -> str:
    return f"{value * 1e3:.1f} ms" if isinstance(value, float) else str(value)


def time_mode(model, batch, mode: str, device, warmup: int, iters: int) -> float:
    set_mode(model, mode)
    return median(time_call(lambda: train_step(model, batch), device, warmup, iters))


def main(argv: list[str] | None = None) -> list[Ratio]:
    args, device, dtype, results = start(step_parser(__doc__), argv, "branch_cost", TITLE, lengths=[64, 128])

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
    return results.finish(ratios, notes)


if __name__ == "__main__":
    main()
