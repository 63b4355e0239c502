"""The argument parser the command-line tools share (torch-free): a bad argument is one line and exit code 2."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that an error prints `error: <message> (see --help)` on one line and exits with 2,
    like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")
