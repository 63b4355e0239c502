"""P7: GPU time to choose the full-attention layers by gate search vs leave-one-out vs KL-guided selection, on the
same tokens (target: gate search >= 5x cheaper than leave-one-out).

Every method runs fully, nothing is extrapolated, on the same N batches (--num-batches x --batch-size x --seq-len
tokens of the selection stream, flashmorph.selection.SELECTION_SPLIT):
  gate search:    N steps, one per batch: forward+backward of the mixed model (activation checkpointing on) and an
                  AdamW step on the gates, as flashmorph.stages.gate_search trains them;
  leave-one-out:  flashmorph.selection.leave_one_out_layout, (L+1) forward passes per batch (all softmax, then each
                  layer linear alone), answer-token loss;
  KL-guided:      flashmorph.selection.kl_layout, the same passes, KL to the all-softmax model on answer positions.
Each cost is linear in N (gate search N x step, the baselines N x (L+1) x forward), so the ratios hold for any N;
the JSON keeps seconds per batch for other counts. One untimed warm-up of each method first (Triton autotuning).
GPU time = the method's wall time on one GPU, synchronised before and after.

    python -m bench.selection_cost --shape llama3-1b --seq-len 8K --num-batches 4 --out runs/bench
"""

from __future__ import annotations

import time

import torch

from bench.common import Ratio, base_parser, format_length, parse_length, ratio, start, synchronize
from bench.morph_steps import build_morphable, set_mode
from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace
from flashmorph.selection import SELECTION_SPLIT, heldout_batches, kl_layout, leave_one_out_layout

TITLE = "P7: selection cost, gate search vs leave-one-out and KL-guided"
TARGET = ">= 5.0"
REG_WEIGHT = 0.5  # the mean-gate regularizer's weight; it changes what the gates learn, not what a step costs


def timed(fn, device) -> tuple[object, float]:
    """(fn(), wall seconds), synchronised on both sides so queued device work is counted."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def gate_search(model, batches, device, lr: float) -> None:
    """One gate-search step per batch: answer-token CE + REG_WEIGHT * mean gate, backward, AdamW on the gates."""
    set_mode(model, "mixed")
    model.train()
    optimizer = torch.optim.AdamW(model.gates.parameters(), lr=lr)
    for batch in batches:
        out = model(batch["input_ids"].to(device), labels=batch["labels"].to(device))
        loss = out["loss_sum"] / out["num_tokens"].clamp(min=1) + REG_WEIGHT * out["gate_values"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> list[Ratio]:
    parser = base_parser(__doc__, default_shape="llama3-1b")
    parser.add_argument("--seq-len", type=parse_length, default=parse_length("8K"))
    parser.add_argument("--num-batches", type=int, default=4, help="N: batches every method processes")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of layers kept full")
    parser.add_argument("--gate-lr", type=float, default=0.05)
    args, device, dtype, results = start(parser, argv, "selection_cost", TITLE, seq_len=64, num_batches=2)

    model = build_morphable(args.shape, device, dtype, checkpointing=True, seed=args.seed)
    config = model.lm.config
    num_pairs = 8 if args.seq_len < 512 else 64
    dataset = RetrievalDataset(DataConfig(tasks={"mqar": 1.0}, seq_len=args.seq_len, num_pairs=num_pairs,
                                          seed=args.seed), TokenSpace.synthetic(config.vocab_size),
                               split=SELECTION_SPLIT)
    batches = heldout_batches(dataset, args.num_batches, args.batch_size)
    methods = {
        "gate_search": lambda b: gate_search(model, b, device, args.gate_lr),
        "leave_one_out": lambda b: leave_one_out_layout(model.lm, model.morph_config, b, args.budget),
        "kl": lambda b: kl_layout(model.lm, model.morph_config, b, args.budget),
    }
    seconds = {}
    for name, method in methods.items():
        method(batches[:1])  # warm-up, untimed
        layout, seconds[name] = timed(lambda: method(batches), device)
        row = {"method": name, "seconds": seconds[name], "seconds_per_batch": seconds[name] / len(batches),
               "num_batches": len(batches), "tokens": len(batches) * args.batch_size * args.seq_len}
        if layout is not None:  # the baselines return their layout, with the forward passes they ran
            row |= {"forward_passes": layout.cost.forward_passes, "full_layers": layout.full_layers}
        results.add_row(**row)

    gate = seconds["gate_search"]
    detail = {name: f"{seconds[name]:.2f} s vs gate search {gate:.2f} s" for name in ("leave_one_out", "kl")}
    at = f"@{format_length(args.seq_len)} x{args.batch_size} x{len(batches)} batches"
    ratios = [Ratio(f"P7 selection GPU time {at}: leave-one-out / gate search", ratio(seconds["leave_one_out"], gate),
                    TARGET, detail["leave_one_out"]),
              Ratio(f"P7 selection GPU time {at}: KL-guided / gate search", ratio(seconds["kl"], gate), "",
                    detail["kl"])]
    notes = [f"shape {args.shape} ({config.num_hidden_layers} layers), budget {args.budget}; every method ran fully "
             f"on the same {len(batches)} batches (no extrapolation)"]
    return results.finish(ratios, notes)


if __name__ == "__main__":
    main()
