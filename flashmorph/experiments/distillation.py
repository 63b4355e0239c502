"""The same distillation for every distinct layout (the project's distill stage, LoRA from the teacher's logits),
then the same evaluation as before distillation."""

import dataclasses
import json
import shutil

import torch

from flashmorph.config import DistillRecipe, ModelConfig, ParallelConfig, RunConfig, StudentConfig
from flashmorph.data.text_config import TextDataConfig
from flashmorph.evaluation.loading import load_eval_model
from flashmorph.experiments.bench import Bench, text_corpus
from flashmorph.experiments.cache import Deadline
from flashmorph.experiments.timing import timed
from flashmorph.io.atomic import atomic_write_text
from flashmorph.run_dir import RunDir
from flashmorph.stages.distill import run_distill

RESULT = "result.json"
DISTILL_SEED_OFFSET = 7919  # a retrieval stream neither the gate search nor the scoring baselines saw


def distill_recipe(bench: Bench, layout_path: str, run_dir) -> DistillRecipe:
    cfg = bench.cfg
    text = TextDataConfig()
    if cfg.distill_text_weight > 0:
        text = TextDataConfig(files=[str(text_corpus(bench.out_dir, "train"))], weight=cfg.distill_text_weight)
    return DistillRecipe(run=RunConfig(run_dir=str(run_dir), seed=0),
                         model=ModelConfig(path=str(bench.teacher_dir), dtype=bench.dtype),
                         student=StudentConfig(layout=layout_path), morph=cfg.morph,
                         data=dataclasses.replace(cfg.data, seed=cfg.data.seed + DISTILL_SEED_OFFSET), text=text,
                         distill=dataclasses.replace(cfg.distill, save_every=0),
                         parallel=ParallelConfig(zero_stage=cfg.zero_stage))


def distill_one(bench: Bench, info, key: str, layout_path: str, full_layers: list[int]) -> dict:
    run_dir = bench.out_dir / "distill" / key
    if (run_dir / RESULT).is_file():
        return json.loads((run_dir / RESULT).read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = distill_recipe(bench, layout_path, run_dir)
    print(f"[selection] distill layout {key}: {recipe.total_steps} steps", flush=True)
    with timed(bench.device) as wall:
        result = run_distill(recipe, info, show_progress=False)
    student = load_eval_model(result.student_dir, dtype=bench.dtype, device=str(bench.device))
    evaluation = bench.evaluate(full_layers, lm=student, apply=False)
    del student
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    out = {"key": key, "full_layers": full_layers, "steps": result.steps,
           "kl_first": result.kl_history[0], "kl_last": result.kl_history[-1], "seconds": wall["seconds"],
           "evaluation": evaluation}
    atomic_write_text(run_dir / RESULT, json.dumps(out))
    shutil.rmtree(RunDir(run_dir).student, ignore_errors=True)  # evaluated; the exported copy is only disk now
    return out


def distill_all(bench: Bench, info, layout_paths: dict[str, str], full_layers: dict[str, list[int]],
                deadline: Deadline) -> dict:
    out = {}
    for key in sorted(layout_paths):
        if not (bench.out_dir / "distill" / key / RESULT).is_file():
            deadline.check(f"distilling layout {key}")
        out[key] = distill_one(bench, info, key, layout_paths[key], full_layers[key])
    return out
