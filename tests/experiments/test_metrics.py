"""The experiment's pure rules: budget rounding, ranks, rank correlation, cost accounting, config checks."""

import math
from pathlib import Path

import pytest

from flashmorph.errors import ConfigError
from flashmorph.experiments.config import budget_layers, layer_budgets, load_experiment, validate_experiment
from flashmorph.experiments.metrics import (
    average_ranks,
    competition_rank,
    distribution_summary,
    scoring_cost,
    search_cost,
    spearman,
)
from flashmorph.experiments.runner import PARTS, parse_parts

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "experiments"


@pytest.mark.parametrize("budget, layers, expected", [
    (0.125, 12, 2),  # 1.5 rounds up (Python's round would too, but 2.5 -> 2 would not)
    (0.25, 12, 3), (0.5, 12, 6), (0.125, 4, 1), (0.25, 4, 1), (0.5, 4, 2),
    (0.125, 20, 3),  # 2.5 rounds half up to 3, where round() gives 2
    (0.01, 12, 1),  # never zero full layers
    (3, 12, 3),
])
def test_budget_layers(budget, layers, expected):
    assert budget_layers(budget, layers) == expected


@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5, -1, 12, 0, True, "half"])
def test_bad_budgets_are_config_errors(budget):
    with pytest.raises(ConfigError, match="selection.budgets"):
        budget_layers(budget, 12)


def test_layer_budgets_are_distinct_and_sorted():
    cfg = load_experiment(None, ["selection.budgets=[0.5, 0.125, 0.25, 1]"])
    assert layer_budgets(cfg, 4) == [1, 2]
    assert layer_budgets(cfg, 12) == [1, 2, 3, 6]


def test_competition_rank():
    population = [0.9, 0.5, 0.5, 0.1]
    assert competition_rank(0.9, population) == 1
    assert competition_rank(0.5, population) == 2  # ties share the better rank
    assert competition_rank(0.1, population) == 4
    assert competition_rank(1.0, population) == 1


def test_distribution_summary():
    s = distribution_summary([0.1, 0.4, 0.3])
    assert (s["count"], s["best"], s["worst"], s["median"]) == (3, 0.4, 0.1, 0.3)
    assert s["mean"] == pytest.approx(0.8 / 3)


def test_spearman():
    assert average_ranks([0.3, 0.9, 0.3]) == [2.5, 1.0, 2.5]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman([1, 1], [1, 2]) is None  # a constant has no ranking
    assert spearman([1], [2]) is None


def test_search_cost_counts_fwd_bwd_passes_and_step_times():
    cost = search_cost(steps=3, micro_batch_size=8, grad_accum_steps=2, seq_len=10, step_seconds=[1.0, 2.0, 3.0, 4.0])
    assert cost["forward_passes"] == cost["backward_passes"] == 6
    assert cost["tokens"] == 6 * 8 * 10
    assert cost["forward_equivalent_tokens"] == 3 * 480
    assert cost["seconds"] == 6.0  # the first 3 steps only
    with pytest.raises(ValueError):
        search_cost(steps=5, micro_batch_size=8, grad_accum_steps=1, seq_len=10, step_seconds=[1.0])


def test_scoring_cost_is_forward_only():
    cost = scoring_cost(num_layers=12, num_batches=8, batch_size=32, seq_len=66, seconds=1.5)
    assert cost["forward_passes"] == 13 * 8 and cost["backward_passes"] == 0
    assert cost["tokens"] == cost["forward_equivalent_tokens"] == 13 * 8 * 32 * 66


def test_parse_parts():
    assert parse_parts(None) == list(PARTS)
    assert parse_parts("distill,search") == ["search", "distill"]  # always in pipeline order
    with pytest.raises(ConfigError, match="not a part"):
        parse_parts("search,plots")


@pytest.mark.parametrize("override, message", [
    ("selection.random_seeds=[]", "random_seeds"),
    ("cost.search_steps=[25, 400]", "cost.search_steps"),
    ("cost.score_batches=[16]", "cost.score_batches"),
    ("evaluation.length_multipliers=[2, 4]", "must include 1"),
    ("selection.nll_data=wiki", "nll_data"),
    ("distill.length_schedule=[{seq_len: 64, steps: 1}]", "length_schedule"),
    ("teacher_dir=/nonexistent/teacher", "teacher_dir"),
    ("data.num_pairs=40", "data.seq_len"),
    ("bogus=1", "unknown field bogus"),
])
def test_bad_configs_fail_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_experiment(load_experiment(RECIPES / "selection.yaml", ["teacher_dir=null", override]))
    assert "\n" not in str(err.value)


def test_both_recipes_validate():
    for name, layers in (("selection.yaml", 12), ("selection_cpu.yaml", 4)):
        cfg = load_experiment(RECIPES / name, ["teacher_dir=null"])
        assert validate_experiment(cfg).num_layers == layers
    gpu = load_experiment(RECIPES / "selection.yaml", ["teacher_dir=null"])
    assert layer_budgets(gpu, 12) == [2, 3, 6] and len(gpu.selection.random_seeds) >= 3
    assert math.comb(12, 3) <= gpu.evaluation.exhaustive_max_layouts < math.comb(12, 6)
