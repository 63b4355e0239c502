"""python -m flashmorph.experiments.plots RESULTS.json --out DIR: the experiment's figures as PNGs, drawn from the
results JSON alone (so the GPU run needs no matplotlib): recall vs context length per method, the gates over the
search's steps, the exhaustive distribution with each method marked, and recall vs selection compute."""

import argparse
import json
import sys
from pathlib import Path

from flashmorph.errors import ConfigError

MARKERS = "osD^v<>px*h"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, count: int, width: float = 5.0):
    fig, axes = plt.subplots(1, max(count, 1), figsize=(width * max(count, 1), 4), squeeze=False)
    return fig, axes[0]


def recall_vs_length(results: dict, plt, path: Path) -> Path | None:
    methods = results["methods"]
    if not methods:
        return None
    fig, axes = _grid(plt, len(methods))
    teacher = (results["parts"].get("evaluate") or {}).get("teacher")
    for ax, (k, rows) in zip(axes, methods.items()):
        for i, row in enumerate(rows):
            for stage, style in (("before", "-"), ("after", "--")):
                evaluation = row[stage]
                if not evaluation:
                    continue
                lengths = sorted(int(n) for n in evaluation["by_length"])
                ax.plot(lengths, [evaluation["by_length"][str(n)]["recall"] for n in lengths], style,
                        marker=MARKERS[i % len(MARKERS)], color=f"C{i}",
                        label=f"{row['method']}{' (distilled)' if stage == 'after' else ''}")
        if teacher:
            lengths = sorted(int(n) for n in teacher["by_length"])
            ax.plot(lengths, [teacher["by_length"][str(n)]["recall"] for n in lengths], ":k", label="teacher")
        ax.set(xscale="log", xlabel="context length (tokens)", ylabel="answer-token recall", ylim=(0, 1.02),
               title=f"{k} full-attention layers")
        ax.minorticks_off()
        ax.set_xticks(lengths, [str(n) for n in lengths])
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gates_over_steps(results: dict, plt, path: Path) -> Path | None:
    search = (results["parts"].get("search") or {}).get("result")
    if not search:
        return None
    history = search["history"]
    fig, axes = _grid(plt, 1, width=7)
    ax = axes[0]
    num_layers = len(history["gates"][0])
    for layer in range(num_layers):
        ax.plot(history["steps"], [g[layer] for g in history["gates"]], color=plt.cm.viridis(layer / max(num_layers - 1, 1)),
                label=f"layer {layer}")
    ax.set(xlabel="gate-search step", ylabel="gate σ(g) (1 = softmax)", ylim=(0, 1), title="gates during the search")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def exhaustive_distribution(results: dict, plt, path: Path) -> Path | None:
    exhaustive = (results["parts"].get("exhaustive") or {}).get("budgets") or {}
    if not exhaustive:
        return None
    fig, axes = _grid(plt, len(exhaustive))
    for ax, (k, ref) in zip(axes, exhaustive.items()):
        ax.hist(ref["recall"], bins=min(30, max(5, len(ref["recall"]) // 4)), color="0.75")
        for i, row in enumerate(results["methods"].get(k, [])):
            if row["before"]:
                ax.axvline(row["before"]["recall"], color=f"C{i}", linestyle="--",
                           label=f"{row['method']} (rank {row['rank']})")
        ax.set(xlabel="answer-token recall, no distillation", ylabel="layouts",
               title=f"all {len(ref['recall'])} layouts with {k} full layers")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def recall_vs_compute(results: dict, plt, path: Path) -> Path | None:
    curves = (results["parts"].get("cost") or {}).get("curves")
    if not curves:
        return None
    budgets = results["budgets"]
    fig, axes = _grid(plt, len(budgets))
    for ax, k in zip(axes, budgets):
        for i, (method, points) in enumerate(curves.items()):
            ax.plot([max(p["cost"]["forward_equivalent_tokens"], 1) for p in points],
                    [p["budgets"][str(k)]["recall"] for p in points], marker=MARKERS[i], color=f"C{i}", label=method)
        ax.set(xscale="log", xlabel="selection compute (forward-equivalent tokens)", ylabel="recall, no distillation",
               ylim=(0, 1.02), title=f"{k} full-attention layers")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(results: dict, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [recall_vs_length(results, plt, out_dir / "recall_vs_length.png"),
             gates_over_steps(results, plt, out_dir / "gates.png"),
             exhaustive_distribution(results, plt, out_dir / "exhaustive.png"),
             recall_vs_compute(results, plt, out_dir / "cost.png")]
    return [p for p in drawn if p is not None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json written by flashmorph.experiments.selection")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    args = parser.parse_args(argv)
    try:
        path = Path(args.results)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; give the results.json of a selection experiment")
        for png in draw_all(json.loads(path.read_text()), Path(args.out)):
            print(png)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
