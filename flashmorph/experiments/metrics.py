"""Pure arithmetic of the selection experiment: ranks against the exhaustive reference, rank correlation, and the
selection cost of a method in passes and tokens. No torch, no I/O, so every rule is unit-tested on its own."""

import math
import statistics
from collections.abc import Sequence

# a backward pass costs about two forward passes (the usual 2:1 FLOP estimate), so one forward+backward pass counts
# as three forward passes when gate search (fwd+bwd) and the scoring baselines (forward only) are put on one axis
FWD_BWD_IN_FORWARDS = 3


def competition_rank(value: float, population: Sequence[float]) -> int:
    """1 + the number of entries strictly better than `value` (rank 1 = best; ties share the better rank)."""
    return 1 + sum(1 for other in population if other > value)


def distribution_summary(values: Sequence[float]) -> dict:
    """Best, worst, median and mean of a recall distribution, and how many layouts it holds."""
    ordered = sorted(values, reverse=True)
    return {"count": len(ordered), "best": ordered[0], "median": statistics.median(ordered),
            "mean": statistics.fmean(ordered), "worst": ordered[-1]}


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values` from the highest down, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on tie-averaged ranks); None when it is undefined (n < 2 or a constant)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def search_cost(steps: int, micro_batch_size: int, grad_accum_steps: int, seq_len: int,
                step_seconds: Sequence[float]) -> dict:
    """Cost of the first `steps` optimizer steps of a one-process gate search: every micro step is one
    forward+backward pass over micro_batch_size x seq_len tokens; seconds = those steps' measured step times."""
    if steps > len(step_seconds):
        raise ValueError(f"{steps} steps asked but only {len(step_seconds)} step times were recorded")
    passes = steps * grad_accum_steps
    tokens = passes * micro_batch_size * seq_len
    return {"forward_passes": passes, "backward_passes": passes, "tokens": tokens,
            "forward_equivalent_tokens": FWD_BWD_IN_FORWARDS * tokens, "seconds": float(sum(step_seconds[:steps]))}


def scoring_cost(num_layers: int, num_batches: int, batch_size: int, seq_len: int, seconds: float) -> dict:
    """Cost of a one-layer-linearized score (leave-one-out, KL, NLL): the all-softmax model and each of the
    num_layers one-linear-layer models run forward on every batch; no backward."""
    passes = (num_layers + 1) * num_batches
    tokens = passes * batch_size * seq_len
    return {"forward_passes": passes, "backward_passes": 0, "tokens": tokens, "forward_equivalent_tokens": tokens,
            "seconds": float(seconds)}


def free_cost() -> dict:
    """Periodic and random layouts read no data."""
    return {"forward_passes": 0, "backward_passes": 0, "tokens": 0, "forward_equivalent_tokens": 0, "seconds": 0.0}
