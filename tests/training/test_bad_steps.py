"""NaN/Inf in a step: skipped on every rank (even when one rank alone sees it), counted in summary.json and
tensorboard, the gates untouched by it; the run stops with NumericalFault (exit 4) after max_bad_steps in a row."""

import json
from pathlib import Path

import pytest
import torch

from flashmorph.config import load_recipe
from flashmorph.model.tiny import build_tiny_model, tiny_config
from flashmorph.training.bad_steps import NUMERICAL_FAULT_EXIT_CODE, BadStepCounter, NumericalFault
from helpers.multiproc import run_distributed

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "embedded.yaml"


def _recipe(model_dir, run_dir, steps, *extra):
    return load_recipe(RECIPE, [f"model.path={model_dir}", f"run.run_dir={run_dir}", f"search.steps={steps}",
                                "search.micro_batch_size=2", "search.save_every=0", "search.budget=1",
                                "data.seq_len=34", "data.num_pairs=4", "search.lr=0.1", *extra])


def _with_nan_at(info, steps: set[int], ranks: set[int]):
    """Make the regularizer, hence the loss, NaN at these 0-based steps on these ranks (one micro step per step)."""
    from flashmorph.training.losses import retrieval

    real, calls = retrieval.regularizer, []

    def regularizer(*args):
        value = real(*args)
        calls.append(None)
        return value * float("nan") if len(calls) - 1 in steps and info.rank in ranks else value

    retrieval.regularizer = regularizer
    return real


def _runs(info, model_dir, root):
    from flashmorph.stages import gate_search
    from flashmorph.training.losses import retrieval

    clean = gate_search.run_gate_search(_recipe(model_dir, root / "clean", 2), info, show_progress=False)
    real = _with_nan_at(info, {2}, {1})  # the third step goes bad on rank 1 only
    skipped = gate_search.run_gate_search(_recipe(model_dir, root / "nan", 3), info, show_progress=False)
    retrieval.regularizer = real
    _with_nan_at(info, {1, 3, 4, 5}, {0})  # bad at steps 2, 4, 5, 6 (1-based): the third in a row stops it
    try:
        gate_search.run_gate_search(_recipe(model_dir, root / "stop", 8, "search.max_bad_steps=3"), info,
                                    show_progress=False)
        stop = None
    except NumericalFault as err:
        stop = str(err)
    retrieval.regularizer = real
    return clean.gate_values, skipped.gate_values, skipped.skipped_steps, stop


def test_a_nan_on_one_rank_skips_the_step_everywhere_and_too_many_in_a_row_stop_the_run(tmp_path):
    model_dir = tmp_path / "model"
    build_tiny_model(tiny_config("llama", num_layers=2), seed=7).save_pretrained(model_dir)
    results = run_distributed(_runs, 2, model_dir, tmp_path)
    for clean, skipped, count, stop in results:
        assert torch.isfinite(skipped).all()
        torch.testing.assert_close(skipped, clean, rtol=0, atol=0)  # step 3 changed nothing: weights nor moments
        assert count == 1
        assert stop is not None and "stopped at step 6: 3 optimizer steps in a row had NaN/Inf loss or gates" in stop
        assert "search.max_bad_steps" in stop and "\n" not in stop
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["skipped_nonfinite_steps"] == 1
    assert json.loads((tmp_path / "clean" / "summary.json").read_text())["skipped_nonfinite_steps"] == 0
    assert not (tmp_path / "stop" / "summary.json").exists()
    log = (tmp_path / "nan" / "log.txt").read_text()
    assert "gate search step 3: non-finite loss or gates on some rank; optimizer step skipped" in log


def test_counter_resets_on_a_good_step_and_the_fault_exits_4():
    counter = BadStepCounter("distill", 2, "distill.max_bad_steps")
    for step, bad in enumerate([True, False, True, False], start=1):
        counter.record(step, bad, "loss")
    assert counter.skipped == 2 and counter.in_row == 0
    counter.record(5, True, "gradients")
    with pytest.raises(NumericalFault, match=r"distill stopped at step 6: 2 optimizer steps in a row had NaN/Inf "
                                             r"gradients.*raise distill\.max_bad_steps"):
        counter.record(6, True, "gradients")
    assert NumericalFault.exit_code == NUMERICAL_FAULT_EXIT_CODE == 4
