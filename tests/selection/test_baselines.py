"""Selection baselines: periodic and random placement, and one-layer-linearized scores on a tiny random model."""

import logging

import pytest
import torch

from flashmorph.errors import ConfigError
from flashmorph.model.config import MorphConfig
from flashmorph.selection import (
    HybridLayout,
    kl_layout,
    leave_one_out_layout,
    linearization_scores,
    nll_layout,
    periodic_indices,
    periodic_layout,
    random_layout,
)
from flashmorph.selection.baselines import METRIC_LABELS


@pytest.mark.parametrize("variant, expected", [
    ("keep_first", [0, 4, 8]), ("keep_last", [3, 7, 11]), ("keep_both", [0, 6, 11]), ("centered", [2, 6, 10]),
])
def test_periodic_variants(variant, expected):
    assert periodic_indices(12, 3, variant) == expected
    layout = periodic_layout(12, 3, variant)
    assert layout.full_layers == expected and layout.inputs["variant"] == variant
    assert layout.cost.forward_passes == 0


def test_periodic_is_evenly_spaced_at_every_budget():
    for variant in ("keep_first", "keep_last", "keep_both", "centered"):
        for k in range(13):
            kept = periodic_indices(12, k, variant)
            assert len(set(kept)) == k and all(0 <= i < 12 for i in kept)
    assert periodic_indices(4, 2, "keep_first") == [0, 2] and periodic_indices(4, 1, "keep_both") == [0]
    with pytest.raises(ConfigError, match="--periodic-variant"):
        periodic_indices(4, 2, "every_other")


def test_random_is_seeded():
    a, b, c = random_layout(16, 5, seed=3), random_layout(16, 5, seed=3), random_layout(16, 5, seed=4)
    assert a.full_layers == b.full_layers != c.full_layers and len(a.full_layers) == 5
    assert random_layout(4, 0).full_layers == [] and random_layout(4, 1.0).full_layers == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="--budget=5 exceeds the 4 layers"):
        random_layout(4, 5)


@pytest.mark.parametrize("build", [
    lambda lm, batches: leave_one_out_layout(lm, MorphConfig(), batches, 2),
    lambda lm, batches: kl_layout(lm, MorphConfig(), batches, 2, positions="answer"),
    lambda lm, batches: kl_layout(lm, MorphConfig(), batches, 0.5, positions="all"),
    lambda lm, batches: nll_layout(lm, MorphConfig(), batches, 2),
], ids=["leave_one_out", "kl_answer", "kl_all", "nll"])
def test_scored_baselines_give_valid_layouts(tiny_lm, heldout, tmp_path, build, caplog):
    lm = tiny_lm("llama", num_layers=4)
    with caplog.at_level(logging.INFO, logger="flashmorph.selection.baselines"):
        layout = build(lm, heldout)
    # the log names what is measured ("answer-token nll"), not the method's metric key ("retrieval")
    label = METRIC_LABELS[layout.inputs["metric"]]
    assert f"layer none linear: {label} = " in caplog.text and f"layer 3 linear: {label} = " in caplog.text
    assert len(layout.full_layers) == 2 and layout.num_layers == 4
    assert layout.cost.forward_passes == (4 + 1) * len(heldout)  # all-softmax + one per linearized layer
    assert layout.cost.tokens == 5 * sum(b["input_ids"].numel() for b in heldout) and layout.cost.wall_seconds > 0
    scores = torch.tensor(layout.layer_scores)
    assert torch.isfinite(scores).all() and scores.abs().max() > 0  # linearizing a layer changes the output
    assert layout.full_layers == sorted(torch.sort(scores, descending=True, stable=True).indices[:2].tolist())
    if layout.method == "kl":
        assert (scores >= 0).all()
    assert HybridLayout.load(layout.save(tmp_path / "hybrid.json")) == layout
    # probing leaves the model as it found it
    assert lm.config._attn_implementation == "sdpa"
    assert not any(hasattr(layer.self_attn, "morph") for layer in lm.model.layers)


def test_linearization_scores_checks_inputs(tiny_lm, heldout):
    lm = tiny_lm("llama", num_layers=2)
    with pytest.raises(ConfigError, match="--kl-positions"):
        linearization_scores(lm, MorphConfig(), heldout, "kl", positions="some")
    with pytest.raises(ConfigError, match="--num-batches"):
        linearization_scores(lm, MorphConfig(), [], "retrieval")
    with pytest.raises(ConfigError, match="--budget=3 exceeds the 2 layers"):
        leave_one_out_layout(lm, MorphConfig(), heldout, 3)
