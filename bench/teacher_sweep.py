"""Search a recipe for the deep proxy teacher: train several TeacherConfig variants side by side on one GPU, each
in its own process with a wall-clock budget, and write one JSON of what each reached (stages advanced, held-out
recall, text perplexity, steps/s). The stage itself (flashmorph.stages.teacher) does the training.

    python -m bench.teacher_sweep --variants bench/teacher_sweep.yaml --minutes 7 --out $OUT/teacher_sweep.json \
        --work /tmp/teacher_sweep

A variant that runs out of time stops like a preempted job (checkpoint + Preempted) and is reported with the
curriculum stages it finished."""

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import signal
import sys
import time
from pathlib import Path

import yaml

from flashmorph.config import TeacherConfig, validate_teacher


def _run_variant(name: str, fields: dict, out_dir: str, seconds: float, queue) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(asctime)s %(message)s",
                        handlers=[logging.FileHandler(Path(out_dir) / f"{name}.log")])
    from flashmorph.errors import Preempted
    from flashmorph.stages.teacher import train_teacher
    from flashmorph.training.preemption import Deadline

    teacher = TeacherConfig(**fields)
    started = time.perf_counter()
    try:
        report = train_teacher(teacher, Path(out_dir) / name, show_progress=False, preemption=Deadline(seconds))
        result = {"finished": True, **report}
    except Preempted as stop:
        progress = json.loads((stop.checkpoint / "progress.json").read_text())
        result = {"finished": False, "train_steps": progress["step"], "stages": progress["stages"],
                  "stage_in_progress": progress["stage"], "running_recall": progress["running"]}
    except Exception as err:  # a crashed variant is reported, never left for the parent to wait on forever
        result = {"finished": False, "error": repr(err), "train_steps": 0, "stages": []}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["steps_per_s"] = round(result["train_steps"] / result["wall_seconds"], 2)
    result["config"] = dataclasses.asdict(teacher)
    queue.put((name, result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="YAML: base: {TeacherConfig fields}, variants: {name: {...}}")
    parser.add_argument("--minutes", type=float, default=7.0, help="wall budget of every variant")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--work", default=None, help="directory for the teachers and logs (default: beside --out)")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(Path(args.variants).read_text())
    names = args.only.split(",") if args.only else list(spec["variants"])
    configs = {name: {**spec["base"], **(spec["variants"][name] or {})} for name in names}
    for name, fields in configs.items():
        validate_teacher(TeacherConfig(**fields))  # every variant is checked before any GPU work
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "teacher_sweep"
    work.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_variant, args=(n, f, str(work), 60 * args.minutes, queue), daemon=True)
             for n, f in configs.items()]

    def stop(signum, frame):  # a stopped sweep must not leave its variants training on (they are not our children
        for p in procs:       # in the signal's process group when run under nohup or a job script)
            p.terminate()
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        name, result = queue.get()
        results[name] = result
        print(f"{name}: finished={result['finished']} stages={[(s['num_pairs'], s['steps'], s['advanced']) for s in result['stages']]}"
              f" recall={result.get('recall_accuracy')} text={result.get('text', {}).get('perplexity_per_byte')}"
              f" {result['steps_per_s']} steps/s", flush=True)
    for p in procs:
        p.join()
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
