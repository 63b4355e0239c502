"""Sensitivity report: neighbouring budgets and thresholds, the margin at the cut, Jaccard overlaps, the plot."""

import importlib.util

import pytest
import torch

from flashmorph.errors import ConfigError
from flashmorph.selection import (
    cut_margin,
    discretize_heads_top_k,
    discretize_top_k,
    format_report,
    jaccard,
    layout_from_full_layers,
    periodic_layout,
    sensitivity_report,
    write_report,
)

GATES = torch.tensor([0.10, 0.90, 0.30, 0.75, 0.05, 0.60])
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_jaccard_and_margin():
    assert jaccard([1, 3], [1, 3]) == 1.0 and jaccard([1, 3], [3, 5]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0 and jaccard([0], []) == 0.0
    assert cut_margin(GATES, [1, 3]) == pytest.approx(0.75 - 0.60)  # k-th kept minus best dropped
    assert cut_margin(GATES, [0, 4]) < 0  # a selection against the score order
    assert cut_margin(GATES, []) is None and cut_margin(GATES, range(6)) is None


def test_neighbouring_budgets_and_thresholds():
    report = sensitivity_report(discretize_top_k(GATES, 2), neighbours=1)
    assert [(s.label, s.kept) for s in report.budgets] == [("k=1", [1]), ("k=2", [1, 3]), ("k=3", [1, 3, 5])]
    assert [s.jaccard for s in report.budgets] == pytest.approx([0.5, 1.0, 2 / 3])
    by_label = {s.label: s.kept for s in report.thresholds}
    assert by_label["gate >= 0.70"] == [1, 3] and by_label["gate >= 0.50"] == [1, 3, 5]
    assert len(report.thresholds) == 9
    edge = sensitivity_report(discretize_top_k(GATES, 0))
    assert [s.label for s in edge.budgets] == ["k=0", "k=1", "k=2"] and edge.margin is None


def test_report_text_and_comparison():
    layout = discretize_top_k(GATES, 2)
    others = {"periodic": periodic_layout(6, 2, "keep_first"), "mine": layout_from_full_layers(6, [1, 3], "x")}
    text = format_report(sensitivity_report(layout, others=others))
    assert "margin at the cut" in text and "+0.15" in text and "k=4" in text and "gate >= 0.90" in text
    assert "Jaccard overlap between selections" in text and "periodic: [0, 3]" in text
    with pytest.raises(ConfigError, match="needs per-layer scores"):
        sensitivity_report(periodic_layout(6, 2))


def test_head_level_margin():
    values = torch.tensor([[0.9, 0.1], [0.3, 0.8]])
    report = sensitivity_report(discretize_heads_top_k(values, budget=2), gate_values=values)
    assert report.head_margin == pytest.approx(0.8 - 0.3) and report.head_spread == pytest.approx(0.8)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib draws the plot")
@pytest.mark.filterwarnings("error")
def test_plot_of_per_layer_gates_without_threshold_warns_nothing(tmp_path):
    """No legend is asked for when nothing in the plot has a label (matplotlib warns about an empty legend)."""
    written = write_report(discretize_top_k(GATES, 2), tmp_path, gate_values=GATES)
    assert [p.name for p in written] == ["sensitivity.txt", "gates.png"]


def test_write_report(tmp_path, monkeypatch, caplog):
    layout = discretize_top_k(GATES, 2)
    if not HAS_MATPLOTLIB:  # the text report still comes; the PNG is skipped with one line saying why
        written = write_report(layout, tmp_path, threshold=0.65)
        assert [p.name for p in written] == ["sensitivity.txt"]
        assert "matplotlib is not installed" in caplog.text
    else:
        written = write_report(layout, tmp_path, gate_values=GATES, threshold=0.65)
        assert [p.name for p in written] == ["sensitivity.txt", "gates.png"]
        assert (tmp_path / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gate >= 0.65" in (tmp_path / "sensitivity.txt").read_text()
