"""How fragile a selection is: the kept set across neighbouring budgets and thresholds, the score margin at the
cut, Jaccard overlaps with other selections; as text, and as a bar plot of the gates (PNG, needs matplotlib)."""

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashmorph.errors import ConfigError
from flashmorph.io.atomic import atomic_write_bytes, atomic_write_text
from flashmorph.selection.discretize import threshold_indices, top_k_indices
from flashmorph.selection.layout import HybridLayout

log = logging.getLogger(__name__)
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GATE_METHODS = ("gates", "threshold")  # methods whose scores are gate values in [0, 1], so thresholds apply
REPORT_TEXT = "sensitivity.txt"
REPORT_PNG = "gates.png"


@dataclass
class Selection:
    label: str  # e.g. "k=3" or "gate >= 0.50"
    kept: list[int]  # softmax layers, ascending
    jaccard: float  # overlap with the reference selection


@dataclass
class SensitivityReport:
    method: str
    layer_scores: list[float]  # [layers], higher = keep softmax
    kept: list[int]  # the reference selection (the layout's full layers)
    margin: float | None  # lowest kept score minus highest dropped score; None if nothing or everything is kept
    budgets: list[Selection]  # top-k at neighbouring k
    thresholds: list[Selection]  # score >= t, for gate methods
    head_margin: float | None = None  # the same margin over heads, for head-level layouts
    head_spread: float = 0.0  # highest minus lowest head gate, the scale head_margin is read against
    full_heads: list[list[bool]] | None = None  # head-level layouts: [layer][head] True = softmax head
    others: dict[str, list[int]] = field(default_factory=dict)  # other layouts' full layers, by name


def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b|; two empty selections agree fully (1.0)."""
    a, b = set(a), set(b)
    return 1.0 if not a | b else len(a & b) / len(a | b)


def cut_margin(scores, kept) -> float | None:
    """min(kept scores) - max(dropped scores). For a top-k selection this is the k-th kept minus the best dropped:
    small means a small change of the scores swaps layers; negative means the selection ignores the score order."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[list(kept)] = True
    if mask.all() or not mask.any():
        return None
    return float(scores[mask].min() - scores[~mask].max())


def sensitivity_report(layout: HybridLayout, neighbours: int = 2, thresholds=None, gate_values=None,
                       others: dict[str, HybridLayout] | None = None) -> SensitivityReport:
    """Selections around `layout`'s: top-k for k within ±neighbours of its count and, for gate methods, thresholds
    (DEFAULT_THRESHOLDS unless given). `gate_values` [layers, heads] adds the head-level margin."""
    if layout.layer_scores is None:
        raise ConfigError(f"the sensitivity report needs per-layer scores and method {layout.method!r} has none; "
                          "drop --report or use --method gates/threshold/leave_one_out/kl/nll")
    scores, kept = layout.layer_scores, layout.full_layers
    num_layers, k = len(scores), len(kept)
    def around(label: str, selected: list[int]) -> Selection:
        return Selection(label, selected, jaccard(selected, kept))

    budgets = [around(f"k={j}", top_k_indices(scores, j))
               for j in range(max(0, k - neighbours), min(num_layers, k + neighbours) + 1)]
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLDS if layout.method in GATE_METHODS else ()
    by_threshold = [around(f"gate >= {t:.2f}" if round(t, 2) == t else f"gate >= {t:g}", threshold_indices(scores, t))
                    for t in sorted(set(thresholds))]
    head_margin, head_spread = None, 0.0
    if layout.is_head_level and gate_values is not None:
        values = torch.as_tensor(gate_values, dtype=torch.float64).reshape(-1)  # [layers * heads], row-major
        full_heads = [i for i, on in enumerate(v for row in layout.full_heads for v in row) if on]
        head_margin, head_spread = cut_margin(values, full_heads), float(values.max() - values.min())
    return SensitivityReport(layout.method, list(scores), kept, cut_margin(scores, kept), budgets, by_threshold,
                             head_margin, head_spread, layout.full_heads,
                             {name: other.full_layers for name, other in (others or {}).items()})


def _margin_text(margin: float | None, spread: float, what: str, unit: str = "layers") -> str:
    if margin is None:
        return f"margin at the cut ({what}): none (everything or nothing is kept)"
    relative = margin / spread if spread > 0 else 0.0  # scores of baselines live on their own scales
    verdict = "the selection ignores the score order" if margin < 0 else (
        f"fragile: a small change of the scores swaps {unit} across the cut" if relative < 0.05 else "clear")
    return f"margin at the cut ({what}): {margin:+.4g} = {100 * relative:.1f}% of the score range ({verdict})"


def format_report(report: SensitivityReport) -> str:
    lines = [f"sensitivity of the {report.method} selection: {len(report.kept)} of {len(report.layer_scores)} "
             f"layers keep softmax: {report.kept}",
             "scores per layer (higher = keep softmax):"]
    for layer, score in enumerate(report.layer_scores):
        lines.append(f"  layer {layer:>3}: {score:.5g}{'  full' if layer in report.kept else ''}")
    spread = max(report.layer_scores) - min(report.layer_scores)
    lines.append(_margin_text(report.margin, spread, "lowest kept minus highest dropped layer"))
    if report.full_heads is not None:
        lines.append("softmax heads per layer: " + "; ".join(
            f"{layer}: {[h for h, on in enumerate(row) if on]}" for layer, row in enumerate(report.full_heads)))
    if report.head_margin is not None:
        lines.append(_margin_text(report.head_margin, report.head_spread, "lowest kept minus highest dropped head",
                                  "heads"))
    lines.append("neighbouring budgets (top-k), Jaccard overlap with the selection:")
    lines += [f"  {s.label:<13} {str(s.kept):<28} jaccard {s.jaccard:.2f}" for s in report.budgets]
    if report.thresholds:
        lines.append("thresholds (keep layers with score >= t), Jaccard overlap with the selection:")
        lines += [f"  {s.label:<13} {str(s.kept):<28} jaccard {s.jaccard:.2f}" for s in report.thresholds]
    if report.others:
        named = {"this": report.kept, **report.others}
        names = list(named)
        width = max(len(n) for n in names) + 2
        lines.append("Jaccard overlap between selections:")
        lines.append(" " * width + "".join(f"{n[:8]:>9}" for n in names))
        for a in names:
            lines.append(f"{a:<{width}}" + "".join(f"{jaccard(named[a], named[b]):>9.2f}" for b in names))
        lines += [f"  {name}: {kept}" for name, kept in named.items()]
    return "\n".join(lines) + "\n"


def plot_gates(report: SensitivityReport, path: str | Path, gate_values=None, threshold: float | None = None) -> bool:
    """Bar plot of the scores per layer, kept layers highlighted (per-head gates as dots). False, with one log
    line, when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install matplotlib to get it)", path)
        return False
    # the object API, not pyplot: no global backend or figure state is touched
    num_layers = len(report.layer_scores)
    fig = Figure(figsize=(min(16.0, max(5.0, 0.35 * num_layers + 2)), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["tab:orange" if i in report.kept else "tab:gray" for i in range(num_layers)]
    ax.bar(range(num_layers), report.layer_scores, color=colors)
    if gate_values is not None and torch.as_tensor(gate_values).dim() == 2:
        values = torch.as_tensor(gate_values, dtype=torch.float32)  # [layers, heads]
        xs = torch.arange(num_layers).repeat_interleave(values.shape[1]).tolist()
        kept = [v for row in report.full_heads for v in row] if report.full_heads else [False] * len(xs)
        for on, style in ((True, {"color": "black", "label": "softmax head"}),
                          (False, {"facecolors": "none", "edgecolors": "black", "label": "head"})):
            points = [(x, v) for x, v, k in zip(xs, values.reshape(-1).tolist(), kept) if k == on]
            if points:
                ax.scatter(*zip(*points), s=12, zorder=3, **style)
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    margin, what = (report.head_margin, "head margin") if report.head_margin is not None else (report.margin, "margin")
    margin = "n/a" if margin is None else f"{margin:+.3g}"
    title = f"{report.method}: {len(report.kept)}/{num_layers} softmax layers (orange), {what} {margin}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer")
    if report.method in GATE_METHODS:
        ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("gate (1 = softmax)" if report.method in GATE_METHODS else "score")
    ax.set_xticks(range(0, num_layers, max(1, -(-num_layers // 40))))  # at most ~40 labels
    if ax.get_legend_handles_labels()[0]:  # per-layer gates and no threshold: nothing to name
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return True


def write_report(layout: HybridLayout, out_dir: str | Path, gate_values=None, threshold: float | None = None,
                 others: dict[str, HybridLayout] | None = None) -> list[Path]:
    """Write sensitivity.txt (and gates.png when matplotlib is installed) into out_dir; returns the paths written."""
    thresholds = None
    if threshold is not None and layout.method in GATE_METHODS:
        thresholds = sorted(set(DEFAULT_THRESHOLDS) | {threshold})
    report = sensitivity_report(layout, thresholds=thresholds, gate_values=gate_values, others=others)
    out_dir = Path(out_dir)
    written = [atomic_write_text(out_dir / REPORT_TEXT, format_report(report))]
    if plot_gates(report, out_dir / REPORT_PNG, gate_values, threshold):
        written.append(out_dir / REPORT_PNG)
    return written
