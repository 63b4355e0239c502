"""Every selection method at every budget, on one teacher and one data stream: gate search (top-k of its gates) and
the project's baselines (periodic, random per seed, leave-one-out, KL-guided, NLL-guided), each with its cost.

Scoring baselines rank layers once (the scores do not depend on the budget), so one scoring run serves all budgets;
gate search likewise serves all budgets with one search (its "mean" regularizer does not see the budget)."""

from flashmorph.experiments.bench import Bench, layout_key
from flashmorph.experiments.metrics import free_cost, scoring_cost
from flashmorph.experiments.timing import timed
from flashmorph.selection.baselines import (
    SELECTION_SPLIT,
    heldout_batches,
    kl_layout,
    leave_one_out_layout,
    nll_layout,
    periodic_layout,
    random_layout,
)
from flashmorph.selection.discretize import discretize_top_k, top_k_indices
from flashmorph.selection.layout import HybridLayout

SCORED = {"leave_one_out": leave_one_out_layout, "kl": kl_layout, "nll": nll_layout}


def scoring_batches(bench: Bench, metric: str, num_batches: int) -> list[dict]:
    sel = bench.cfg.selection
    if metric == "nll" and sel.nll_data == "text":
        dataset = bench.text_windows("train", bench.cfg.data.seq_len)
    else:
        dataset = bench.retrieval(SELECTION_SPLIT)
    return heldout_batches(dataset, num_batches, sel.score_batch_size)


def score_layers(bench: Bench, metric: str, num_batches: int, budget: int) -> tuple[HybridLayout, dict]:
    """The project's scored baseline on the first `num_batches` batches: its layout at `budget` and its cost."""
    batches = scoring_batches(bench, metric, num_batches)
    lm = bench.teacher()
    kwargs = {"positions": bench.cfg.selection.kl_positions} if metric == "kl" else {}
    with timed(bench.device) as wall:
        layout = SCORED[metric](lm, bench.cfg.morph, batches, budget, **kwargs)
    seq_len = batches[0]["input_ids"].shape[1]
    cost = scoring_cost(bench.num_layers, num_batches, bench.cfg.selection.score_batch_size, seq_len, wall["seconds"])
    cost["cpu_seconds"] = wall["cpu_seconds"]
    # the baseline counts its own passes and tokens: they must be what the settings imply
    if (layout.cost.forward_passes, layout.cost.tokens) != (cost["forward_passes"], cost["tokens"]):
        raise RuntimeError(f"{metric}: the baseline ran {layout.cost.forward_passes} passes / {layout.cost.tokens} "
                           f"tokens, the settings imply {cost['forward_passes']} / {cost['tokens']}")
    return layout, cost


def select_all(bench: Bench, budgets: list[int], main_search: dict) -> dict:
    """{"methods": {name: {"cost": ..., "layer_scores": ...}}, "layouts": {k: {name: [full layers]}}}."""
    sel, num_layers = bench.cfg.selection, bench.num_layers
    methods: dict = {}
    layouts: dict = {str(k): {} for k in budgets}
    for k in budgets:
        layouts[str(k)]["gates"] = discretize_top_k(main_search["layer_scores"], k).full_layers
    methods["gates"] = {"cost": main_search["cost"], "layer_scores": main_search["layer_scores"]}
    for k in budgets:
        layouts[str(k)]["periodic"] = periodic_layout(num_layers, k, sel.periodic_variant).full_layers
        for seed in sel.random_seeds:
            layouts[str(k)][f"random_s{seed}"] = random_layout(num_layers, k, seed=seed).full_layers
    methods["periodic"] = {"cost": free_cost(), "variant": sel.periodic_variant}
    for seed in sel.random_seeds:
        methods[f"random_s{seed}"] = {"cost": free_cost(), "seed": seed}
    for metric in SCORED:
        print(f"[selection] scoring layers: {metric} on {sel.score_batches} batches", flush=True)
        layout, cost = score_layers(bench, metric, sel.score_batches, budgets[0])
        methods[metric] = {"cost": cost, "layer_scores": layout.layer_scores}
        for k in budgets:
            layouts[str(k)][metric] = top_k_indices(layout.layer_scores, k)  # the rule _scored_layout applies
    return {"methods": methods, "layouts": layouts}


def distinct_layouts(layouts: dict) -> dict[str, list[int]]:
    """layout key -> full layers, over every budget and method (identical choices are evaluated once)."""
    out = {}
    for by_method in layouts.values():
        for full_layers in by_method.values():
            out[layout_key(full_layers)] = sorted(full_layers)
    return out


def save_layout_files(bench: Bench, layouts: dict) -> dict[str, str]:
    """hybrid.json per distinct layout (what distillation reads): layout key -> path."""
    from flashmorph.selection.layout import layout_from_full_layers

    paths = {}
    for key, full_layers in distinct_layouts(layouts).items():
        path = bench.out_dir / "layouts" / f"{key}.json"
        layout_from_full_layers(bench.num_layers, full_layers, "experiment", inputs={"key": key}).save(path, overwrite=True)
        paths[key] = str(path)
    return paths
