"""What the command-line tools share (torch-free): the argument parser, and user errors as one line with exit code 2."""

import argparse
import sys

from flashmorph.errors import FlashMorphError


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that an error prints `error: <message> (see --help)` on one line and exits with 2,
    like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def fail(err: Exception) -> int:
    """Print a user error (a FlashMorphError) as one line, `error: <what and the fix>`, and return the exit code 2
    of every bad input."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def run_tool(run, args: argparse.Namespace) -> int:
    """run(args)'s exit code, or fail()'s 2 when it raises a FlashMorphError."""
    try:
        return run(args)
    except FlashMorphError as err:
        return fail(err)
