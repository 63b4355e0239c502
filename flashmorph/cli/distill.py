"""Distillation entry point: the hybrid student learns the original model's logits.

    deepspeed --num_gpus 8 launcher/distill.py --config recipes/llama3_8b_distill.yaml
    python launcher/distill.py --config recipes/embedded_distill.yaml          # one process (CPU or 1 GPU)

Exit codes: 0 done, 2 bad recipe or unusable run directory, 75 stopped by SIGTERM/SIGUSR1 after saving a
complete checkpoint (rerun with --resume); anything else is a crash.
"""

import argparse
import os
import sys

from flashmorph.cli._stage import check_world_size_flag, dry_run, run_stage, stage_parser
from flashmorph.config import DistillRecipe, load_recipe, validate_distill_recipe
from flashmorph.errors import ConfigError
from flashmorph.run_dir import check_resume


DESCRIPTIONS = {"distill": "Distill a hybrid student from its original model.",
                "long_context": "Long-context finetune of a distilled hybrid."}


def parse_args(argv=None, stage: str = "distill") -> argparse.Namespace:
    parser = stage_parser(DESCRIPTIONS[stage], "recipes/embedded_distill.yaml", "distill.steps=100")
    return check_world_size_flag(parser, parser.parse_args(argv))


def main(argv=None, stage: str = "distill") -> int:
    """The distill stage, or (stage="long_context") the same step along a length curriculum."""
    args = parse_args(argv, stage)
    if args.dry_run:
        return dry_run(args, stage)

    def prepare():
        recipe = load_recipe(args.config, args.override, cls=DistillRecipe)
        # before any process group, model or file exists: the launcher already fixed the world size
        validate_distill_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
        check_resume(recipe.run.run_dir, args.resume, args.resume_from)
        if stage == "long_context" and not recipe.distill.length_schedule:
            raise ConfigError("distill.length_schedule is empty; the long-context stage needs a length curriculum, "
                              "e.g. [{seq_len: 8192, steps: 200}, {seq_len: 32768, steps: 100}]")
        return recipe

    def run(recipe, info, guard):
        from flashmorph.stages.distill import run_distill  # torch-heavy: only after validation

        run_distill(recipe, info, resume=args.resume, show_progress=not args.no_progress, stage=stage,
                    preemption=guard, resume_from=args.resume_from)

    return run_stage(prepare, run)


if __name__ == "__main__":
    sys.exit(main())
