"""The CPU mode of the selection experiment end to end (recipes/experiments/selection_cpu.yaml, teacher shortened),
through its command line, and the invariants its results must satisfy whatever the numbers are."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "experiments" / "selection_cpu.yaml"
# only the teacher is cut short (it is the teacher stage's own tests that check it learns); all else is the CPU mode
OVERRIDES = ["--override", "teacher.max_steps_per_stage=40"]


def _run(out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # one intra-op thread: tiny models gain nothing from more, and on a shared 2-core box spinning threads slow it 5x
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flashmorph.experiments.selection", "--config", str(RECIPE),
                           "--out", str(out), *OVERRIDES, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection_cpu")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def _recalls(evaluation: dict) -> list[float]:
    return [cell["recall"] for cell in evaluation["by_length"].values()]


def test_every_part_ran_and_is_recorded(experiment):
    out, results = experiment
    meta, cfg = results["meta"], results["config"]
    assert meta["missing"] == [] and meta["devices"] == ["cpu"]
    assert meta["versions"]["torch"] and meta["versions"]["transformers"] and meta["versions"]["flashmorph_git_commit"]
    assert all(seconds is not None and seconds >= 0 for part, seconds in meta["wall_seconds"].items() if part != "teacher")
    assert results["budgets"] == [1, 2]  # 1/4 and 1/2 of 4 layers
    report = (out / "report.md").read_text()
    for method in ("gates", "periodic", "random_s0", "random_s1", "leave_one_out", "kl", "nll"):
        assert f"| {method} |" in report
    seq_len = cfg["data"]["seq_len"]
    lengths = {str(seq_len * m) for m in cfg["evaluation"]["length_multipliers"]}
    for k, rows in results["methods"].items():
        assert {r["method"] for r in rows} == {"gates", "periodic", "random_s0", "random_s1", "leave_one_out", "kl",
                                               "nll"}
        for row in rows:
            assert len(row["full_layers"]) == int(k)
            for stage in ("before", "after"):
                evaluation = row[stage]
                assert set(evaluation["by_length"]) == lengths
                assert all(0.0 <= r <= 1.0 for r in _recalls(evaluation))
                assert math.isfinite(evaluation["perplexity"]) and evaluation["perplexity"] > 1.0


def test_exhaustive_ranks_and_the_best_layout(experiment):
    _, results = experiment
    exhaustive = results["parts"]["exhaustive"]["budgets"]
    for k, rows in results["methods"].items():
        ref = exhaustive[k]
        assert len(ref["layouts"]) == math.comb(4, int(k)) == len({tuple(x) for x in ref["layouts"]})
        by_layout = dict(zip(map(tuple, ref["layouts"]), ref["recall"]))
        best = max(ref["recall"])
        for row in rows:
            recall = row["before"]["recall"]
            # the evaluation part scored this layout on its own; the exhaustive part must agree exactly
            assert recall == by_layout[tuple(row["full_layers"])]
            assert 1 <= row["rank"] <= math.comb(4, int(k)) and row["rank_total"] == math.comb(4, int(k))
            assert best >= recall
            assert (row["rank"] == 1) == (recall == best)


def test_costs_follow_from_the_settings(experiment):
    _, results = experiment
    cfg, methods = results["config"], results["parts"]["baselines"]["methods"]
    search, sel, seq_len = cfg["search"], cfg["selection"], cfg["data"]["seq_len"]
    gates = methods["gates"]["cost"]
    assert gates["forward_passes"] == gates["backward_passes"] == search["steps"] * search["grad_accum_steps"]
    assert gates["tokens"] == search["steps"] * search["micro_batch_size"] * seq_len
    assert gates["seconds"] > 0
    for metric in ("leave_one_out", "kl", "nll"):
        cost = methods[metric]["cost"]
        assert cost["forward_passes"] == 5 * sel["score_batches"] and cost["backward_passes"] == 0
        assert cost["tokens"] == cost["forward_passes"] * sel["score_batch_size"] * seq_len and cost["seconds"] > 0
    for name in ("periodic", "random_s0", "random_s1"):
        assert methods[name]["cost"]["forward_passes"] == methods[name]["cost"]["tokens"] == 0
    history = results["parts"]["search"]["result"]["history"]
    assert history["steps"] == list(range(1, search["steps"] + 1))
    assert all(0.0 < g < 1.0 for step in history["gates"] for g in step)


def test_cost_curves_grow_with_compute(experiment):
    _, results = experiment
    cfg, curves = results["config"], results["parts"]["cost"]["curves"]
    assert [p["steps"] for p in curves["gates"]] == sorted({*cfg["cost"]["search_steps"], cfg["search"]["steps"]})
    for metric in ("leave_one_out", "kl"):
        assert [p["batches"] for p in curves[metric]] == sorted({*cfg["cost"]["score_batches"],
                                                                 cfg["selection"]["score_batches"]})
    for points in curves.values():
        passes = [p["cost"]["forward_passes"] for p in points]
        assert passes == sorted(passes) and len(set(passes)) == len(passes)
        for p in points:
            assert all(0.0 <= b["recall"] <= 1.0 for b in p["budgets"].values())
    # the full-compute point is the method's own choice
    chosen = {k: {r["method"]: r["full_layers"] for r in rows} for k, rows in results["methods"].items()}
    for k in chosen:
        assert curves["gates"][-1]["budgets"][k]["full_layers"] == chosen[k]["gates"]
        assert curves["leave_one_out"][-1]["budgets"][k]["full_layers"] == chosen[k]["leave_one_out"]


def test_distillation_and_ablations(experiment):
    _, results = experiment
    cfg = results["config"]
    distilled = results["parts"]["distill"]["layouts"]
    keys = {r["key"] for rows in results["methods"].values() for r in rows}
    assert set(distilled) == keys  # every distinct layout, once
    for run in distilled.values():
        assert run["steps"] == cfg["distill"]["steps"] and math.isfinite(run["kl_last"])
    for k, ranking in results["distill_ranking"].items():
        assert ranking["layouts"] == len({r["key"] for r in results["methods"][k]})
        assert ranking["spearman"] is None or -1.0 <= ranking["spearman"] <= 1.0
    ablations = results["parts"]["ablations"]
    assert set(ablations["variants"]) == {"main", "reg_2", "granularity_head", "text_0.25"}
    head = results["parts"]["ablations"]["variants"]["granularity_head"]
    assert head["settings"]["granularity"] == "head"
    threshold = ablations["threshold"]
    assert threshold["k"] == len(threshold["full_layers"])
    main_scores = results["parts"]["search"]["result"]["layer_scores"]
    assert threshold["full_layers"] == [i for i, g in enumerate(main_scores) if g >= threshold["threshold"]]


def test_plots_draw_from_the_json(experiment, tmp_path):
    pytest.importorskip("matplotlib")
    from flashmorph.experiments.plots import draw_all

    _, results = experiment
    pngs = draw_all(results, tmp_path)
    assert {p.name for p in pngs} == {"recall_vs_length.png", "gates.png", "exhaustive.png", "cost.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_deadline_stops_and_a_rerun_continues(experiment):
    out, results = experiment
    (out / "parts" / "ablations.json").unlink()
    stopped = _run(out, "--only", "ablations", "--max-minutes", "0")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "rerun the same command" in stopped.stdout
    assert json.loads((out / "results.json").read_text())["meta"]["missing"] == ["ablations"]
    resumed = _run(out, "--only", "ablations")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = json.loads((out / "results.json").read_text())["parts"]["ablations"]["variants"]
    # the variant searches were cached by the first run, so the rerun reads the same gates
    assert again == results["parts"]["ablations"]["variants"]


def test_another_config_needs_another_out_dir(experiment):
    out, _ = experiment
    proc = _run(out, "--override", "search.lr=0.1")
    assert proc.returncode == 2 and "another configuration" in proc.stderr
