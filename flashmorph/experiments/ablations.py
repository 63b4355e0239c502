"""Ablations of gate search: threshold vs top-k discretization, regularizer weight, gate granularity and the data
mix of the search. (Before vs after distillation needs no extra run: the report compares the two evaluations.)"""

from flashmorph.experiments.bench import Bench
from flashmorph.experiments.cache import Deadline
from flashmorph.experiments.searches import run_search
from flashmorph.selection.discretize import discretize_threshold, top_k_indices


def _variant(bench: Bench, search: dict, budgets: list[int]) -> dict:
    return {"settings": search["settings"], "cost": search["cost"], "layer_scores": search["layer_scores"],
            "final_accuracy": search["final_accuracy"],
            "budgets": {str(k): {"full_layers": (layers := top_k_indices(search["layer_scores"], k)),
                                 "recall": bench.recall_at_train_length(layers)} for k in budgets}}


def run_ablations(bench: Bench, info, budgets: list[int], main_search: dict, deadline: Deadline) -> dict:
    abl = bench.cfg.ablations
    threshold = discretize_threshold(main_search["layer_scores"], abl.threshold)
    out: dict = {"threshold": {"threshold": abl.threshold, "full_layers": threshold.full_layers,
                               "k": len(threshold.full_layers),
                               "evaluation": bench.evaluate(threshold.full_layers) if threshold.full_layers else None},
                 "variants": {"main": _variant(bench, main_search, budgets)}}
    runs = [(f"reg_{w:g}", {"reg_weight": w}) for w in abl.reg_weights if w != bench.cfg.search.reg_weight]
    if abl.head_granularity and bench.cfg.morph.gate_granularity != "head":
        runs.append(("granularity_head", {"granularity": "head"}))
    if abl.text_weight > 0:
        runs.append((f"text_{abl.text_weight:g}", {"text_weight": abl.text_weight}))
    for name, kwargs in runs:
        deadline.check(f"the {name} gate search")
        out["variants"][name] = _variant(bench, run_search(bench, info, name, **kwargs), budgets)
    return out
