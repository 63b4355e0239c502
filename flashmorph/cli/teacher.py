"""Teacher entry point: train a synthetic-data teacher (the embedded default's, or the 12-layer proxy teacher of the
selection experiment) into a HF model directory, on the GPU when there is one.

    python launcher/teacher.py --config recipes/experiments/proxy_teacher.yaml
    python launcher/teacher.py --config recipes/experiments/proxy_teacher.yaml --override teacher.device=cpu \
        --override teacher.num_layers=2 --override out_dir=/tmp/tiny_teacher      # the tiny CPU mode

The directory in `out_dir` is resumable: a stopped run (SIGTERM, --max-minutes, a crash) continues from its latest
checkpoint when the same command runs again, and a complete teacher is reused as it is.

Exit codes: 0 done, 2 bad recipe, 3 the teacher never finished its curriculum (it is still saved, with its report;
see teacher.require_complete), 75 stopped by SIGTERM/SIGUSR1 or --max-minutes after saving a checkpoint (run the
same command again to continue); anything else is a crash.
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flashmorph.cli._stage import run_stage
from flashmorph.config import TeacherConfig, load_recipe, validate_teacher
from flashmorph.errors import ConfigError


@dataclass
class TeacherRecipe:
    out_dir: str = "runs/teacher"  # the HF directory the teacher is written to (with teacher_report.json)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a synthetic-data teacher into a HF model directory.")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/experiments/proxy_teacher.yaml")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one recipe field (repeatable), e.g. --override teacher.device=cpu")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many minutes with a checkpoint (exit 75); the same command continues")
    parser.add_argument("--resume", action="store_true",
                        help="accepted for symmetry with the other stages: a teacher always continues from its latest "
                             "checkpoint in out_dir, and a complete one is reused")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def prepare():
        if args.max_minutes is not None and args.max_minutes <= 0:
            raise ConfigError(f"--max-minutes={args.max_minutes} must be > 0")
        recipe = load_recipe(args.config, args.override, cls=TeacherRecipe)
        validate_teacher(recipe.teacher)
        if not recipe.out_dir:
            raise ConfigError("out_dir must name the directory the teacher is written to")
        return recipe

    def run(recipe, info, guard):
        from flashmorph.run_dir import setup_file_logging
        from flashmorph.stages.teacher import require_teacher, train_teacher
        from flashmorph.training.preemption import Deadline

        if info.world_size > 1:
            raise ConfigError(f"the teacher trains in one process; run it with python, not {info.world_size} ranks")
        Path(recipe.out_dir).mkdir(parents=True, exist_ok=True)
        setup_file_logging(recipe.out_dir, info.rank)  # console + <out_dir>/log.txt

        report = train_teacher(recipe.teacher, recipe.out_dir, show_progress=not args.no_progress,
                               preemption=Deadline(None if args.max_minutes is None else 60 * args.max_minutes, guard))
        require_teacher(report, recipe.teacher, recipe.out_dir)

    return run_stage(prepare, run)


if __name__ == "__main__":
    sys.exit(main())
