"""Gate-search runs of the experiment (the main one and the ablation variants) through the project's stage, with the
gate values of every step read back from the stage's tensorboard scalars (gate/layer_NN, perf/step_time_s)."""

import dataclasses
import json
import shutil
from pathlib import Path

from flashmorph.config import GateSearchRecipe, ModelConfig, ParallelConfig, RunConfig
from flashmorph.experiments.bench import Bench
from flashmorph.experiments.metrics import search_cost
from flashmorph.experiments.timing import timed
from flashmorph.io.atomic import atomic_write_text
from flashmorph.run_dir import RunDir
from flashmorph.selection.discretize import load_gate_file
from flashmorph.stages.gate_search import run_gate_search

RESULT = "result.json"


def search_recipe(bench: Bench, run_dir: Path, reg_weight: float | None = None,
                  granularity: str | None = None) -> GateSearchRecipe:
    cfg = bench.cfg
    # log_every=1: the gates of every step are the search's history (cost curve, plots); no mid-run checkpoints,
    # which would only add disk time to the measured cost
    search = dataclasses.replace(cfg.search, budget=1, log_every=1, save_every=0,
                                 reg_weight=cfg.search.reg_weight if reg_weight is None else reg_weight)
    morph = dataclasses.replace(cfg.morph, gate_granularity=granularity or cfg.morph.gate_granularity)
    return GateSearchRecipe(run=RunConfig(run_dir=str(run_dir), seed=0),
                            model=ModelConfig(path=str(bench.teacher_dir), dtype=bench.dtype),
                            morph=morph, data=cfg.data, search=search,
                            parallel=ParallelConfig(zero_stage=cfg.zero_stage))


def gate_history(tb_dir: Path, num_layers: int) -> dict:
    """{"steps": [...], "gates": [[per-layer gate] per step], "step_seconds": [...]} from the run's tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0 = keep every event, no sampling
    events.Reload()
    per_layer = [{e.step: e.value for e in events.Scalars(f"gate/layer_{i:02d}")} for i in range(num_layers)]
    seconds = {e.step: e.value for e in events.Scalars("perf/step_time_s")}
    steps = sorted(seconds)
    return {"steps": steps, "gates": [[layer[s] for layer in per_layer] for s in steps],
            "step_seconds": [seconds[s] for s in steps]}


def run_search(bench: Bench, info, name: str, reg_weight: float | None = None, granularity: str | None = None,
               text_weight: float = 0.0) -> dict:
    """One gate search under <out_dir>/searches/<name>; a finished one is read back instead of rerun."""
    run_dir = bench.out_dir / "searches" / name
    if (run_dir / RESULT).is_file():
        return json.loads((run_dir / RESULT).read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted search restarts: its history must be one run
    recipe = search_recipe(bench, run_dir, reg_weight, granularity)
    dataset = None
    if text_weight > 0:
        from flashmorph.data.mixture import text_retrieval_mixture

        text = bench.text_windows("train", bench.cfg.data.seq_len)
        dataset = text_retrieval_mixture(bench.retrieval("train"), text, text_weight, seed=bench.cfg.data.seed)
    print(f"[selection] gate search {name}: {recipe.search.steps} steps", flush=True)
    with timed(bench.device) as wall:
        run_gate_search(recipe, info, show_progress=False, dataset=dataset)
    gates = load_gate_file(RunDir(run_dir).gates)
    history = gate_history(RunDir(run_dir).tb, bench.num_layers)
    search = recipe.search
    result = {
        "name": name,
        "settings": {"steps": search.steps, "lr": search.lr, "reg_weight": search.reg_weight,
                     "regularizer": search.regularizer, "micro_batch_size": search.micro_batch_size,
                     "grad_accum_steps": search.grad_accum_steps, "granularity": recipe.morph.gate_granularity,
                     "text_weight": text_weight},
        "gate_values": gates.gate_values.tolist(),
        "layer_scores": gates.layer_scores.tolist(),
        "final_accuracy": json.loads(RunDir(run_dir).summary.read_text())["final_retrieval_accuracy"],
        "history": history,
        # cost of the search itself: the sum of its step times (model loading and engine setup excluded, as for the
        # scoring baselines); wall_seconds is the whole stage call for reference
        "cost": search_cost(search.steps, search.micro_batch_size, search.grad_accum_steps, bench.cfg.data.seq_len,
                            history["step_seconds"]),
        "wall_seconds": wall["seconds"],
        "cpu_seconds": wall["cpu_seconds"],
    }
    atomic_write_text(run_dir / RESULT, json.dumps(result))
    return result


def gates_after(result: dict, updates: int) -> list[float]:
    """Per-layer gate scores after `updates` optimizer steps. The stage logs at step s the gates its forward used,
    i.e. after s - 1 updates; the final file holds them after every update. No scheduler depends on the total step
    count (constant lr, lambda ramp by step), so these are exactly the gates an `updates`-step search would end with."""
    total = result["settings"]["steps"]
    if not 1 <= updates <= total:
        raise ValueError(f"updates={updates} must lie in [1, {total}]")
    if updates == total:
        return result["layer_scores"]
    history = result["history"]
    return history["gates"][history["steps"].index(updates + 1)]
