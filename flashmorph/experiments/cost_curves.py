"""Cost at equal quality: recall of the layout a method picks as a function of the compute it was given (a prefix
of the gate search's steps; fewer scoring batches for leave-one-out and KL)."""

from flashmorph.experiments.bench import Bench
from flashmorph.experiments.cache import Deadline
from flashmorph.experiments.methods import score_layers
from flashmorph.experiments.metrics import search_cost
from flashmorph.experiments.searches import gates_after
from flashmorph.selection.discretize import top_k_indices


def cost_curves(bench: Bench, budgets: list[int], main_search: dict, deadline: Deadline) -> dict:
    """{"gates": [point...], "leave_one_out": [...], "kl": [...]}; a point holds its compute, its cost and, per
    budget, the chosen layers and their undistilled recall at the training length."""
    cfg = bench.cfg
    s = main_search["settings"]
    out: dict = {"gates": []}
    for steps in sorted({*cfg.cost.search_steps, s["steps"]}):
        scores = gates_after(main_search, steps)
        point = {"steps": steps, "cost": search_cost(steps, s["micro_batch_size"], s["grad_accum_steps"],
                                                     cfg.data.seq_len, main_search["history"]["step_seconds"]),
                 "budgets": {}}
        for k in budgets:
            layers = top_k_indices(scores, k)
            point["budgets"][str(k)] = {"full_layers": layers, "recall": bench.recall_at_train_length(layers)}
        out["gates"].append(point)
    for metric in ("leave_one_out", "kl"):
        out[metric] = []
        for n in sorted({*cfg.cost.score_batches, cfg.selection.score_batches}):
            deadline.check(f"the {metric} cost curve at {n} batches")
            layout, cost = score_layers(bench, metric, n, budgets[0])
            point = {"batches": n, "cost": cost, "budgets": {}}
            for k in budgets:
                layers = top_k_indices(layout.layer_scores, k)
                point["budgets"][str(k)] = {"full_layers": layers, "recall": bench.recall_at_train_length(layers)}
            out[metric].append(point)
    return out
