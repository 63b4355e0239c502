"""python -m flashmorph.experiments.selection --config recipes/experiments/selection.yaml [--override a.b=c]
[--out DIR] [--only PART,...] [--max-minutes M]

Gate search against every selection baseline on one teacher. Exit codes: 0 done (or every asked part cached),
2 bad config, 3 the teacher never finished its curriculum, 75 stopped at --max-minutes: rerun the same command."""

import argparse
import sys

from flashmorph.errors import FlashMorphError
from flashmorph.experiments.cache import DeadlineReached
from flashmorph.experiments.config import load_experiment, validate_experiment
from flashmorph.experiments.report import write_results
from flashmorph.experiments.runner import PARTS, Runner, check_out_dir, parse_parts

INCOMPLETE_EXIT_CODE = 75  # as a preempted stage: nothing is lost, the same command continues


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. recipes/experiments/selection.yaml")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    parser.add_argument("--only", default=None, help=f"comma list of parts to run: {','.join(PARTS)} (default all)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new unit of work after this many minutes; cached work is kept")
    parser.add_argument("--progress", action="store_true", help="progress bars for the teacher")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(args.config, args.override)
        if args.out is not None:
            cfg.out_dir = args.out
        shape = validate_experiment(cfg)
        parts = parse_parts(args.only)
        check_out_dir(cfg)
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flashmorph.parallel.distributed import distributed_session

    code = 0
    try:
        with distributed_session() as info:
            Runner(cfg, shape, parts, args.max_minutes, args.progress).run(info)
    except DeadlineReached as stop:
        print(f"[selection] INCOMPLETE: {stop}; rerun the same command to continue", flush=True)
        code = INCOMPLETE_EXIT_CODE
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        code = getattr(err, "exit_code", 2)
    finally:
        results, report = write_results(cfg, shape)
        print(f"[selection] results: {results}\n[selection] report: {report}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
