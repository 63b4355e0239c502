"""P1: peak GPU memory of a gate-search step ÷ that of a plain frozen forward+backward of the same model (target
<= 1.10), at 8K and 32K tokens, with activation checkpointing; absolute GiB too.

Both sides are one step of bench/morph_steps.py on the same MorphableLM and the same tokens: answer-token loss,
every weight frozen, activation checkpointing on, backward reaching the input embeddings.
  gate search:       every layer mixed, g·softmax + (1-g)·linear; the gates get gradients.
  frozen fwd+bwd:    every layer softmax only (the original model's attention): what backpropagating through the
                     frozen model costs anyway, e.g. for a prompt or an adapter below it.
Peaks are torch.cuda.max_memory_allocated over one step after a warm-up step, weights included.

    python -m bench.gate_memory --shape llama3-8b --lengths 8K,32K --out runs/bench
"""

from __future__ import annotations

from bench.common import (OOM, Ratio, allocated, format_bytes, format_length, measure_peak, ratio, retrieval_batch,
                          run_or_oom, start)
from bench.morph_steps import build_morphable, set_mode, step_parser, train_step

TITLE = "P1: gate-search peak memory vs frozen forward+backward"
TARGET = "<= 1.10"
SIDES = {"mixed": "gate search", "full": "frozen fwd+bwd"}


def measure_step_peak(model, batch, mode: str, device, warmup: int):
    """Peak bytes of one step in `mode`, after `warmup` steps of the same shape."""
    set_mode(model, mode)
    for _ in range(warmup):
        train_step(model, batch)
    _, peak = measure_peak(lambda: train_step(model, batch), device)
    return peak


def main(argv: list[str] | None = None) -> list[Ratio]:
    args, device, dtype, results = start(step_parser(__doc__), argv, "gate_memory", TITLE, lengths=[64, 128])

    model = build_morphable(args.shape, device, dtype, checkpointing=args.checkpointing, seed=args.seed)
    weights = allocated(device)  # weights and gates: what every peak includes
    vocab = model.lm.config.vocab_size
    ratios = []
    for length in args.lengths:
        batch = retrieval_batch(vocab, length, args.batch, device, seed=args.seed)
        peaks = {mode: run_or_oom(lambda: measure_step_peak(model, batch, mode, device, args.warmup), device)
                 for mode in SIDES}
        results.add_row(length=length, batch=args.batch, gate_search_peak_bytes=peaks["mixed"],
                        frozen_fwd_bwd_peak_bytes=peaks["full"], weights_bytes=weights)
        value = ratio(peaks["mixed"], peaks["full"])
        if device.type == "cuda":
            detail = (f"{format_bytes(peaks['mixed'])} / {format_bytes(peaks['full'])} "
                      f"(weights {format_bytes(weights)})")
        else:
            detail = "peak memory is measured on CUDA only"
        label = f"P1 peak memory @{format_length(length)} x{args.batch}: gate search / frozen fwd+bwd"
        ratios.append(Ratio(label, value, TARGET, detail))
        results.set_ratios(ratios)
    notes = [f"shape {args.shape}, activation checkpointing {'on' if args.checkpointing else 'off'}, "
             f"{str(dtype).removeprefix('torch.')} weights; peaks include the weights"]
    if any(OOM in (row["gate_search_peak_bytes"], row["frozen_fwd_bwd_peak_bytes"]) for row in results.rows):
        notes.append("a side ran out of memory at some length: its ratio is n/a")
    return results.finish(ratios, notes)


if __name__ == "__main__":
    main()
