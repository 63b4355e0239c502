"""What every stage entry point shares: its arguments, validation before any process group, and exit codes.

Exit codes: 0 done, 2 bad recipe or unusable run directory, 3 the embedded teacher never finished its curriculum
(TeacherNotReady; see teacher.require_complete), 4 too many optimizer steps in a row had NaN/Inf values
(NumericalFault; search.max_bad_steps / distill.max_bad_steps), 75 (PREEMPTED_EXIT_CODE) stopped by SIGTERM/SIGUSR1
after saving a complete checkpoint (rerun with --resume); anything else is a crash.
"""

import argparse
import os
import sys

from flashmorph.errors import FlashMorphError
from flashmorph.parallel.quiet import quiet_third_party  # torch-free


def stage_parser(description: str, example_recipe: str, example_override: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"recipe YAML, e.g. {example_recipe}")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help=f"override one recipe field (repeatable), e.g. --override {example_override}")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--resume-from", type=_step, default=None, metavar="STEP",
                        help="continue from the checkpoint of this step (implies --resume); refused if missing or "
                             "damaged")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print one rank's parameters, bytes, activation estimate and communication plan at "
                             "--world-size ranks, then exit; builds on the meta device, reads no weights")
    parser.add_argument("--world-size", type=_positive, default=None, metavar="N",
                        help="ranks the dry run plans for (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser


def _step(text: str) -> int:
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a checkpoint step; give the N of a checkpoints/step_N")
    return step


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ranks; give a positive integer")
    return int(text)


def check_world_size_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--world-size plans a dry run; a real run takes its world size from the launcher ($WORLD_SIZE)."""
    if args.world_size is not None and not args.dry_run:
        parser.error("--world-size goes with --dry-run; a run's world size comes from its launcher (deepspeed, "
                     "torchrun, srun)")
    return args


def dry_run(args: argparse.Namespace, stage: str) -> int:
    """--dry-run: the plan of `stage` for args.config at args.world_size ranks, printed; no process group."""
    quiet_third_party()
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from flashmorph.estimate import dry_run_main

        print(dry_run_main(args.config, world_size, stage, args.override))
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_stage(prepare, run) -> int:
    """prepare() loads and validates the recipe (before any process group, model or file exists);
    run(recipe, info, guard) runs the stage inside the distributed session and a preemption guard."""
    quiet_third_party()
    try:
        recipe = prepare()
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # torch, DeepSpeed and the process group only once the recipe passed: a refusal stays a fraction of a second
    from flashmorph.errors import Preempted
    from flashmorph.parallel.distributed import distributed_session
    from flashmorph.training.preemption import PREEMPTED_EXIT_CODE, PreemptionGuard

    try:
        with distributed_session() as info, PreemptionGuard() as guard:
            run(recipe, info, guard)
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    return 0
