"""Choose the softmax layers of a hybrid from learned gates, or by a baseline heuristic, and write hybrid.json.

    python tools/discretize_gates.py --gates runs/embedded/gates.safetensors --budget 2 \
        --out runs/embedded/hybrid.json --report
    python tools/discretize_gates.py --gates runs/embedded/gates.safetensors --method threshold --threshold 0.5 \
        --out runs/embedded/hybrid_t05.json
    python tools/discretize_gates.py --method kl --recipe recipes/embedded.yaml --budget 2 \
        --out runs/embedded/kl/hybrid.json --report --compare runs/embedded/hybrid.json

--report writes sensitivity.txt and gates.png into the directory of --out: give each method its own directory.
"""

import argparse
import logging
import re
import sys
from pathlib import Path

from flashmorph.cli._tool import ArgumentParser, run_tool
from flashmorph.errors import ConfigError
from flashmorph.parallel.quiet import quiet_third_party
from flashmorph.run_dir import RunDir

METHODS = ("gates", "threshold", "periodic", "leave_one_out", "kl", "nll", "random")
GATE_METHODS = ("gates", "threshold")
SCORED_BASELINES = ("leave_one_out", "kl", "nll")
# mirrored from flashmorph.selection.baselines, which imports torch: argument checks stay instant
PERIODIC_VARIANTS = ("keep_first", "keep_last", "keep_both", "centered")
KL_POSITIONS = ("answer", "all")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description="Discretize gates (or run a selection baseline) into a hybrid.json layout.")
    parser.add_argument("--method", choices=METHODS, default="gates",
                        help="gates: top-k of the gates; threshold: gates >= --threshold; the rest are baselines")
    parser.add_argument("--gates", help="gates.safetensors written by gate search (--method gates/threshold)")
    parser.add_argument("--model", help="HF model directory for the baselines (default: the recipe's model.path, "
                                        "or <run_dir>/teacher of the embedded recipe)")
    parser.add_argument("--recipe", help="recipe YAML giving the baselines their data, morph settings and dtype")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one recipe field (repeatable), e.g. --override data.seq_len=512")
    parser.add_argument("--budget", help="softmax layers to keep: a count (int, e.g. 2) or a fraction (float, "
                                         "e.g. 0.5; 1.0 = all). Default: search.budget of the gate search run/recipe. "
                                         "With --level head: heads overall")
    parser.add_argument("--threshold", type=float, help="--method threshold: keep layers whose gate is >= this")
    parser.add_argument("--level", choices=("layer", "head"), default="layer",
                        help="head: a head-level hybrid from per-head gates")
    parser.add_argument("--heads-per-layer", type=int, help="--level head: keep this many heads in every layer")
    parser.add_argument("--periodic-variant", choices=PERIODIC_VARIANTS, default="keep_first",
                        help="--method periodic: evenly spaced from layer 0, ending at the last layer, spanning "
                             "both, or centered in each stride")
    parser.add_argument("--seed", type=int, default=0, help="--method random: seed of the draw")
    parser.add_argument("--kl-positions", choices=KL_POSITIONS, default="answer",
                        help="--method kl: compare distributions on answer tokens or on every position")
    parser.add_argument("--num-batches", type=int, default=4, help="held-out batches for leave_one_out/kl/nll")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per held-out batch")
    parser.add_argument("--device", default=None, help="device the baselines run the model on (default: cuda if "
                                                       "available, else cpu)")
    parser.add_argument("--out", required=True, help="hybrid.json to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--report", action="store_true", help="also write sensitivity.txt and gates.png next to --out")
    parser.add_argument("--compare", action="append", default=[], metavar="HYBRID_JSON",
                        help="other hybrid.json files to compare with in the report (Jaccard overlap; repeatable)")
    return parser.parse_args(argv)


def parse_budget(text: str | None) -> int | float | None:
    """'2' -> 2 (a count), '0.5' -> 0.5 (a fraction); None stays None (take the run's budget)."""
    if text is None:
        return None
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--budget={text!r} must be a count (int, e.g. 2) or a fraction (float, e.g. 0.5)") from None


def _reject(args, flags: list[str], why: str) -> None:
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value not in (None, False, []):
            raise ConfigError(f"{flag} {why}")


def check_args(args) -> dict:
    """Every check that needs no model and no torch: a bad input stops here, in well under a second."""
    method = args.method
    plan = {"budget": parse_budget(args.budget)}
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} already exists; pass --force to overwrite it or choose another path")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file path such as {out / 'hybrid.json'}")
    if args.gates is not None and not Path(args.gates).is_file():
        raise ConfigError(f"--gates {args.gates} does not exist; point it at a run's gates.safetensors")
    plan["others"] = _load_compared(args.compare)
    if args.num_batches < 1 or args.batch_size < 1:
        raise ConfigError("--num-batches and --batch-size must be >= 1")
    if method in GATE_METHODS:
        if args.gates is None:
            raise ConfigError(f"--method {method} needs --gates runs/<run>/gates.safetensors")
        _reject(args, ["--model", "--recipe", "--override"], f"is for the baselines; --method {method} reads --gates")
    else:
        if args.level == "head":
            raise ConfigError(f"--level head needs per-head gates; --method {method} selects whole layers")
    if method == "threshold":
        if args.threshold is None:
            raise ConfigError("--method threshold needs --threshold, a gate value in [0, 1] such as 0.5")
        _reject(args, ["--budget", "--heads-per-layer"], "does not apply to --method threshold; drop it")
    elif args.threshold is not None and method != "gates":
        raise ConfigError(f"--threshold applies to --method threshold (or a gates report), not --method {method}")
    if args.heads_per_layer is not None:
        if args.level != "head" or method != "gates":
            raise ConfigError("--heads-per-layer needs --method gates --level head")
        if args.budget is not None:
            raise ConfigError("give --budget (heads overall) or --heads-per-layer, not both")
    if args.level == "head" and method == "gates" and args.budget is None and args.heads_per_layer is None:
        raise ConfigError("--level head needs --budget (a count or fraction of all heads) or --heads-per-layer")
    if args.report and method in ("periodic", "random"):
        raise ConfigError(f"--report needs per-layer scores and --method {method} has none; drop --report")
    if method in SCORED_BASELINES and args.recipe is None:
        raise ConfigError(f"--method {method} needs --recipe (its data, morph and model.dtype sections), "
                          "e.g. --recipe recipes/embedded.yaml")
    if method in ("periodic", "random") and not (args.gates or args.model or args.recipe):
        raise ConfigError(f"--method {method} needs the layer count: pass --model DIR, --recipe or --gates")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model} holds no config.json; point it at a HF model directory")
    if args.recipe is not None:
        from flashmorph.config import load_recipe, validate_recipe

        recipe = load_recipe(args.recipe, args.override)
        if args.model is not None:
            recipe.model.path = args.model
        elif recipe.model.path is None and method in SCORED_BASELINES:
            teacher = RunDir(recipe.run.run_dir).teacher
            if not (teacher / "config.json").is_file():
                raise ConfigError(f"--recipe {args.recipe} has model.path null and {teacher} holds no model; "
                                  "run gate search first or pass --model DIR")
            recipe.model.path = str(teacher)
        # this tool runs in one process: the recipe's TP x SP degrees only have to fit the model (one DP replica)
        validate_recipe(recipe, recipe.parallel.tensor_parallel * recipe.parallel.sequence_parallel)
        plan["recipe"] = recipe
        if plan["budget"] is None:
            plan["budget"], plan["budget_source"] = recipe.search.budget, f"search.budget of {args.recipe}"
    if plan["budget"] is None and method != "threshold" and args.heads_per_layer is None:
        plan["budget"], plan["budget_source"] = _run_budget(args)
    return plan


def _load_compared(paths: list[str]) -> dict:
    if not paths:
        return {}
    from flashmorph.selection.layout import HybridLayout

    others = {}
    for path in paths:
        layout = HybridLayout.load(path)
        name, n = layout.method, 2
        while name in others:  # e.g. two random layouts with different seeds
            name, n = f"{layout.method}#{n}", n + 1
        others[name] = layout
    return others


def _run_budget(args) -> tuple[int | float, str]:
    """The budget gate search used: search.budget in the run's config.yaml, next to --gates."""
    run_config = RunDir(Path(args.gates).parent).config if args.gates else None
    if run_config is None or not run_config.is_file():
        raise ConfigError("--budget is required (no gate search config.yaml next to --gates to take "
                          "search.budget from)")
    from flashmorph.config import load_recipe

    try:
        return load_recipe(run_config).search.budget, f"search.budget of {run_config}"
    except ConfigError:
        raise ConfigError(f"--budget is required ({run_config} is not a readable recipe)") from None


def _num_layers(args, plan) -> int:
    """The layer count, read from the gates file or config.json: nothing is built."""
    from flashmorph.config import load_recipe, model_shape

    if args.method in SCORED_BASELINES:
        return model_shape(plan["recipe"]).num_layers
    if args.gates is not None:
        from flashmorph.selection import load_gate_file

        return load_gate_file(args.gates).num_layers
    if args.model is not None:
        return model_shape(load_recipe(overrides=[f"model.path={args.model}"])).num_layers
    return model_shape(plan["recipe"]).num_layers


def _from_gates(args, plan):
    from flashmorph import selection

    gates = selection.load_gate_file(args.gates)
    inputs = {"gates": str(args.gates), "gate_search_steps": gates.metadata.get("steps"),
              "model": gates.metadata.get("model"), "granularity": "head" if gates.per_head else "layer"}
    if "budget_source" in plan:
        inputs["budget_source"] = plan["budget_source"]
    if args.method == "threshold" and args.level == "head":
        layout = selection.discretize_heads_threshold(gates.gate_values, args.threshold, inputs)
    elif args.method == "threshold":
        layout = selection.discretize_threshold(gates.gate_values, args.threshold, inputs)
    elif args.level == "head":
        layout = selection.discretize_heads_top_k(gates.gate_values, plan["budget"], args.heads_per_layer, inputs)
    else:
        layout = selection.discretize_top_k(gates.gate_values, plan["budget"], inputs)
    return layout, gates.gate_values


def _from_baseline(args, plan, num_layers: int):
    from flashmorph import selection

    inputs = {"budget_source": plan["budget_source"]} if "budget_source" in plan else {}
    if args.method == "periodic":
        return selection.periodic_layout(num_layers, plan["budget"], args.periodic_variant, inputs), None
    if args.method == "random":
        return selection.random_layout(num_layers, plan["budget"], args.seed, inputs), None

    import torch

    from flashmorph.data import RetrievalDataset
    from flashmorph.data.from_model import data_for_model
    from flashmorph.model.load import load_causal_lm

    recipe = plan["recipe"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_causal_lm(recipe.model.path, recipe.model.dtype).to(device)
    space, haystack = data_for_model(recipe.model.path, recipe.data, lm.config.vocab_size)
    dataset = RetrievalDataset(recipe.data, space, haystack, split=selection.SELECTION_SPLIT)
    batches = selection.heldout_batches(dataset, args.num_batches, args.batch_size)
    inputs.update({"model": str(recipe.model.path), "recipe": str(args.recipe), "data_split": selection.SELECTION_SPLIT,
                   "data_seed": recipe.data.seed})
    if args.method == "leave_one_out":
        return selection.leave_one_out_layout(lm, recipe.morph, batches, plan["budget"], inputs), None
    if args.method == "kl":
        return selection.kl_layout(lm, recipe.morph, batches, plan["budget"], args.kl_positions, inputs), None
    return selection.nll_layout(lm, recipe.morph, batches, plan["budget"], inputs), None


def run(args) -> int:
    plan = check_args(args)
    from flashmorph.selection import resolve_budget, write_report

    num_layers = _num_layers(args, plan)
    if args.method != "threshold" and args.level == "layer":
        resolve_budget(plan["budget"], num_layers)  # a bad budget fails before any model loads
    for other in plan["others"].values():
        if other.num_layers != num_layers:
            raise ConfigError(f"--compare {other.source} describes {other.num_layers} layers, this model has "
                              f"{num_layers}; compare layouts of the same model")
    if args.method in GATE_METHODS:
        layout, gate_values = _from_gates(args, plan)
    else:
        layout, gate_values = _from_baseline(args, plan, num_layers)
    out = layout.save(args.out, overwrite=args.force)
    cost = layout.cost
    print(f"wrote {out}: {len(layout.full_layers)}/{layout.num_layers} layers keep softmax {layout.full_layers} "
          f"(method {layout.method}; {cost.forward_passes} forward passes, {cost.wall_seconds:.2f} s)")
    if args.report:
        for path in write_report(layout, out.parent, gate_values, args.threshold, plan["others"]):
            print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_tool(run, args)


if __name__ == "__main__":
    sys.exit(main())
