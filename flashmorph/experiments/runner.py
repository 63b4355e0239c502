"""Run the selection experiment part by part: each part caches its result in <out_dir>/parts, so a call that stops
(a deadline, a preempted machine) is continued by the same command; the report is rebuilt from the cache every call."""

import dataclasses
import datetime
import json
import logging
from pathlib import Path

import torch

from flashmorph.errors import ConfigError
from flashmorph.experiments.bench import Bench
from flashmorph.experiments.cache import Deadline, PartCache
from flashmorph.experiments.config import ExperimentConfig, layer_budgets
from flashmorph.experiments.timing import timed
from flashmorph.io.atomic import atomic_write_text
from flashmorph.model.shape import ModelShape
from flashmorph.run_dir import TEACHER_REPORT_NAME, RunDir

log = logging.getLogger(__name__)
PARTS = ("teacher", "search", "baselines", "evaluate", "exhaustive", "cost", "distill", "ablations")
NEEDS = {"search": ("teacher",), "baselines": ("teacher", "search"), "evaluate": ("baselines",),
         "exhaustive": ("teacher",), "cost": ("search",), "distill": ("baselines",), "ablations": ("search",)}
CONFIG_FILE = "config.json"
MEMO = "recall_memo"


def parse_parts(only: str | None) -> list[str]:
    if not only:
        return list(PARTS)
    wanted = [p.strip() for p in only.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ConfigError(f"--only {unknown[0]!r} is not a part; use a comma list of {', '.join(PARTS)}")
    return [p for p in PARTS if p in wanted]


def check_out_dir(cfg: ExperimentConfig) -> None:
    """Cached parts are only valid for the config that made them: another config needs another --out."""
    out = Path(cfg.out_dir)
    resolved = {k: v for k, v in cfg.to_dict().items() if k != "out_dir"}
    path = out / CONFIG_FILE
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(resolved)):
            raise ConfigError(f"{out} holds results of another configuration; pass a fresh --out (or delete {out})")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(resolved, indent=1))


def resolve_teacher(cfg: ExperimentConfig, run_teacher: bool, show_progress: bool) -> tuple[Path, dict]:
    """The teacher directory and its report; trains it (part "teacher") when no teacher_dir is given."""
    if cfg.teacher_dir is not None:
        report_file = Path(cfg.teacher_dir) / TEACHER_REPORT_NAME
        return Path(cfg.teacher_dir), json.loads(report_file.read_text()) if report_file.is_file() else {}
    from flashmorph.stages.teacher import require_teacher, train_teacher

    teacher_dir = RunDir(cfg.out_dir).teacher  # an experiment directory keeps its teacher where a run does
    if not (teacher_dir / TEACHER_REPORT_NAME).is_file() and not run_teacher:
        raise ConfigError(f"no trained teacher in {teacher_dir}; run --only teacher first (or set teacher_dir)")
    print(f"[selection] teacher: {cfg.teacher.num_layers} layers, hidden {cfg.teacher.hidden_size}", flush=True)
    report = train_teacher(cfg.teacher, teacher_dir, show_progress=show_progress)
    require_teacher(report, cfg.teacher, teacher_dir)  # one loud line, or a refusal, for a teacher that never learned
    return teacher_dir, report


class Runner:
    def __init__(self, cfg: ExperimentConfig, shape: ModelShape, parts: list[str], max_minutes: float | None,
                 show_progress: bool = False):
        self.cfg, self.shape, self.parts = cfg, shape, parts
        self.cache = PartCache(cfg.out_dir)
        self.deadline = Deadline(max_minutes)
        self.show_progress = show_progress
        self.budgets = layer_budgets(cfg, shape.num_layers)

    def needed(self, part: str) -> dict:
        data = self.cache.load(part)
        if data is None:
            raise ConfigError(f"part {part!r} has no cached result in {self.cache.root}; run --only {part} first")
        return data

    def run(self, info) -> None:
        teacher_dir, teacher_report = resolve_teacher(self.cfg, "teacher" in self.parts, self.show_progress)
        if not self.cache.has("teacher"):
            self.cache.save("teacher", {"dir": str(teacher_dir), "report": teacher_report, **_stamp(None)})
        bench = Bench(self.cfg, teacher_dir, self.shape.num_layers, self.shape.vocab_size)
        bench.recall_memo.update((self.cache.load(MEMO) or {}).get("recall", {}))
        try:
            for part in self.parts:
                if part == "teacher" or self.cache.has(part):
                    print(f"[selection] {part}: cached", flush=True)
                    continue
                self.deadline.check(f"part {part}")
                with timed(bench.device) as wall:
                    data = getattr(self, f"part_{part}")(bench, info)
                data.update(_stamp(wall))
                self.cache.save(part, data)
                print(f"[selection] {part}: done in {wall['seconds']:.1f} s", flush=True)
        finally:
            self.cache.save(MEMO, {"recall": bench.recall_memo})

    # ------------------------------------------------------------------------------------------------ parts

    def part_search(self, bench, info) -> dict:
        from flashmorph.experiments.searches import run_search

        return {"result": run_search(bench, info, "main")}

    def part_baselines(self, bench, info) -> dict:
        from flashmorph.experiments.methods import save_layout_files, select_all

        selected = select_all(bench, self.budgets, self.needed("search")["result"])
        selected["layout_files"] = save_layout_files(bench, selected["layouts"])
        return selected

    def part_evaluate(self, bench, info) -> dict:
        from flashmorph.experiments.methods import distinct_layouts

        layouts = distinct_layouts(self.needed("baselines")["layouts"])
        out = {"teacher": bench.evaluate(range(self.shape.num_layers)), "layouts": {}}
        for key, layers in sorted(layouts.items()):
            self.deadline.check(f"evaluating layout {key}")
            out["layouts"][key] = bench.evaluate(layers)
        return out

    def part_exhaustive(self, bench, info) -> dict:
        from flashmorph.experiments.exhaustive import run_exhaustive

        return {"budgets": run_exhaustive(bench, self.budgets, self.deadline)}

    def part_cost(self, bench, info) -> dict:
        from flashmorph.experiments.cost_curves import cost_curves

        return {"curves": cost_curves(bench, self.budgets, self.needed("search")["result"], self.deadline)}

    def part_distill(self, bench, info) -> dict:
        from flashmorph.experiments.distillation import distill_all
        from flashmorph.experiments.methods import distinct_layouts

        baselines = self.needed("baselines")
        return {"layouts": distill_all(bench, info, baselines["layout_files"], distinct_layouts(baselines["layouts"]),
                                       self.deadline)}

    def part_ablations(self, bench, info) -> dict:
        from flashmorph.experiments.ablations import run_ablations

        return run_ablations(bench, info, self.budgets, self.needed("search")["result"], self.deadline)


def _stamp(wall: dict | None) -> dict:
    """Where and when a part ran, and how long it took."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"_device": device, "_date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "_wall_seconds": None if wall is None else round(wall["seconds"], 2)}
