"""Top-k and threshold selection on hand-made gates: the right layers, ties, budget edge cases, head-level budgets."""

import pytest
import torch

from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.io.atomic import atomic_save_safetensors
from flashmorph.selection.discretize import (
    discretize_heads_threshold,
    discretize_heads_top_k,
    discretize_threshold,
    discretize_top_k,
    load_gate_file,
    resolve_budget,
    top_k_indices,
)

GATES = torch.tensor([0.10, 0.90, 0.30, 0.75, 0.05, 0.60])  # layers ranked: 1, 3, 5, 2, 0, 4


@pytest.mark.parametrize("budget, kept", [(0, []), (1, [1]), (2, [1, 3]), (3, [1, 3, 5]), (6, [0, 1, 2, 3, 4, 5]),
                                          (0.5, [1, 3, 5]), (0.0, []), (1.0, [0, 1, 2, 3, 4, 5])])
def test_top_k_picks_the_highest_gates(budget, kept):
    layout = discretize_top_k(GATES, budget)
    assert layout.full_layers == kept
    assert layout.layer_types == ["full" if i in kept else "linear" for i in range(6)]
    assert layout.method == "gates" and layout.inputs["k"] == len(kept)


def test_ties_go_to_the_lower_layer():
    tied = torch.tensor([0.5, 0.7, 0.5, 0.7, 0.5])
    assert top_k_indices(tied, 1) == [1]
    assert top_k_indices(tied, 3) == [0, 1, 3]
    assert top_k_indices(tied, 4) == [0, 1, 2, 3]
    assert discretize_top_k(torch.full((4,), 0.3), 2).full_layers == [0, 1]


@pytest.mark.parametrize("budget, message", [
    (7, r"--budget=7 exceeds the 6 layers"), (-1, r"--budget=-1 must be >= 0"),
    (1.5, r"--budget=1.5 as a fraction must lie in \[0, 1\]"), (-0.2, r"--budget=-0.2 as a fraction"),
    (float("nan"), r"--budget=nan"), (True, r"--budget=True must be a count"),
])
def test_bad_budgets_name_the_flag(budget, message):
    with pytest.raises(ConfigError, match=message):
        discretize_top_k(GATES, budget)


def test_resolve_budget_rounds_like_gate_search():
    from flashmorph.config import num_full_layers

    for fraction in (0.125, 0.25, 0.375, 0.5, 0.625):
        assert resolve_budget(fraction, 4) == num_full_layers(fraction, 4)


def test_threshold():
    assert discretize_threshold(GATES, 0.6).full_layers == [1, 3, 5]  # >= keeps the gate equal to the threshold
    assert discretize_threshold(GATES, 0.95).full_layers == []
    assert discretize_threshold(GATES, 0.0).full_layers == list(range(6))
    with pytest.raises(ConfigError, match="--threshold=1.2"):
        discretize_threshold(GATES, 1.2)


HEAD_GATES = torch.tensor([[0.9, 0.1, 0.2, 0.8],   # layer 0
                           [0.3, 0.3, 0.3, 0.3],   # layer 1: all tied
                           [0.05, 0.7, 0.95, 0.6]])  # layer 2


def test_head_budget_over_all_heads():
    layout = discretize_heads_top_k(HEAD_GATES, budget=4)  # 0.95, 0.9, 0.8, 0.7
    assert layout.full_heads == [[True, False, False, True], [False] * 4, [False, True, True, False]]
    assert layout.layer_types == ["full", "linear", "full"] and layout.inputs["num_full_heads"] == 4
    half = discretize_heads_top_k(HEAD_GATES, budget=0.5)  # 6 of 12 heads: + 0.6 and the first tied 0.3
    assert half.full_heads[1] == [True, False, False, False]
    assert discretize_heads_top_k(HEAD_GATES, budget=0).layer_types == ["linear"] * 3
    with pytest.raises(ConfigError, match="--budget=13 exceeds the 12 heads"):
        discretize_heads_top_k(HEAD_GATES, budget=13)


def test_heads_per_layer():
    layout = discretize_heads_top_k(HEAD_GATES, heads_per_layer=1)
    assert layout.full_heads == [[True, False, False, False], [True, False, False, False],
                                 [False, False, True, False]]
    assert layout.layer_types == ["full"] * 3
    with pytest.raises(ConfigError, match="--heads-per-layer=5 exceeds"):
        discretize_heads_top_k(HEAD_GATES, heads_per_layer=5)
    with pytest.raises(ConfigError, match="exactly one"):
        discretize_heads_top_k(HEAD_GATES, budget=2, heads_per_layer=1)


def test_head_threshold_and_layer_gates_refused():
    layout = discretize_heads_threshold(HEAD_GATES, 0.75)
    assert layout.full_heads == [[True, False, False, True], [False] * 4, [False, False, True, False]]
    with pytest.raises(ConfigError, match="needs per-head gates"):
        discretize_heads_top_k(GATES, budget=2)
    # per-head gates without a head-level budget select whole layers by their mean gate
    assert discretize_top_k(HEAD_GATES, 1).full_layers == [2]  # means 0.5, 0.3, 0.575


def test_load_gate_file(tmp_path):
    path = atomic_save_safetensors({"gate_values": HEAD_GATES, "layer_scores": HEAD_GATES.mean(-1)},
                                   tmp_path / "gates.safetensors", metadata={"num_layers": "3", "steps": "5"})
    gates = load_gate_file(path)
    assert gates.per_head and gates.num_layers == 3 and gates.metadata["steps"] == "5"
    torch.testing.assert_close(gates.layer_scores, HEAD_GATES.mean(-1))
    bad = atomic_save_safetensors({"gate_values": torch.tensor([0.5, 1.5])}, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match=r"must be finite and lie in \[0, 1\]"):
        load_gate_file(bad)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_gate_file(tmp_path / "cut.safetensors")
