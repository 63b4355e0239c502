"""Gate search entry point.

    deepspeed --num_gpus 8 launcher/gate_search.py --config recipes/llama3_8b_gate_search.yaml
    python launcher/gate_search.py --config recipes/embedded.yaml          # one process (CPU or 1 GPU)

Exit codes: 0 done, 2 bad recipe or unusable run directory, 3 the embedded teacher never finished its curriculum
(see teacher.require_complete), 75 stopped by SIGTERM/SIGUSR1 after saving a complete checkpoint (rerun with
--resume); anything else is a crash.
"""

import argparse
import os
import sys

from flashmorph.cli._stage import check_world_size_flag, dry_run, run_stage, stage_parser
from flashmorph.config import load_recipe, validate_recipe
from flashmorph.run_dir import check_resume


def parse_args(argv=None) -> argparse.Namespace:
    parser = stage_parser("Train the per-layer softmax/linear gates of a morphed model.", "recipes/embedded.yaml",
                          "search.steps=100")
    return check_world_size_flag(parser, parser.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args, "gate_search")

    def prepare():
        recipe = load_recipe(args.config, args.override)
        # before any process group, model or file exists: the launcher already fixed the world size
        validate_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
        check_resume(recipe.run.run_dir, args.resume, args.resume_from)
        return recipe

    def run(recipe, info, guard):
        from flashmorph.stages.gate_search import run_gate_search  # torch-heavy: only after validation

        run_gate_search(recipe, info, resume=args.resume, show_progress=not args.no_progress, preemption=guard,
                        resume_from=args.resume_from)

    return run_stage(prepare, run)


if __name__ == "__main__":
    sys.exit(main())
