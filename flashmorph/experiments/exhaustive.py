"""The exhaustive reference: every layout of a budget, where there are few enough, scored without distillation, so
each method's choice gets a rank (1 = the best layout there is)."""

import itertools
import math

from flashmorph.experiments.bench import Bench
from flashmorph.experiments.cache import Deadline
from flashmorph.experiments.metrics import competition_rank, distribution_summary


def enumerable_budgets(num_layers: int, budgets: list[int], max_layouts: int) -> list[int]:
    return [k for k in budgets if math.comb(num_layers, k) <= max_layouts]


def run_exhaustive(bench: Bench, budgets: list[int], deadline: Deadline) -> dict:
    """{k: {"layouts": [[layers]...], "recall": [...]}} for every enumerable budget, at the training length."""
    out = {}
    for k in enumerable_budgets(bench.num_layers, budgets, bench.cfg.evaluation.exhaustive_max_layouts):
        deadline.check(f"the exhaustive reference at k={k}")
        layouts = [list(c) for c in itertools.combinations(range(bench.num_layers), k)]
        print(f"[selection] exhaustive: {len(layouts)} layouts with {k} full layers", flush=True)
        out[str(k)] = {"layouts": layouts, "recall": [bench.recall_at_train_length(c) for c in layouts]}
    return out


def method_ranks(exhaustive: dict, recalls: dict[str, dict[str, float]]) -> dict:
    """{k: {"summary": ..., "ranks": {method: rank}, "total": C(L, k)}} of each method's undistilled recall.
    `recalls`: {k: {method: recall at the training length}}."""
    out = {}
    for k, ref in exhaustive.items():
        population = ref["recall"]
        out[k] = {"total": len(population), "summary": distribution_summary(population),
                  "ranks": {m: competition_rank(r, population) for m, r in recalls.get(k, {}).items()}}
    return out
