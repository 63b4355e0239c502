"""Gate search entry point.

    deepspeed --num_gpus 8 launcher/gate_search.py --config recipes/llama3_8b_gate_search.yaml
    python launcher/gate_search.py --config recipes/embedded.yaml          # one process (CPU or 1 GPU)

Exit codes: 0 done, 2 bad recipe or unusable run directory, 75 stopped by SIGTERM/SIGUSR1 after saving a
complete checkpoint (rerun with --resume); anything else is a crash.
"""

import argparse
import sys

from flashmorph.config import load_recipe, validate_recipe
from flashmorph.errors import FlashMorphError
from flashmorph.parallel.distributed import distributed_session
from flashmorph.stages.gate_search import run_gate_search
from flashmorph.training.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionGuard


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the per-layer softmax/linear gates of a morphed model.")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/embedded.yaml")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one recipe field (repeatable), e.g. --override search.steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.override)
        validate_recipe(recipe)  # before any process group, model or file exists
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with distributed_session() as info, PreemptionGuard() as guard:
            run_gate_search(recipe, info, resume=args.resume, show_progress=not args.no_progress, preemption=guard)
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
