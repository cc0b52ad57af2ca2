"""The command line's shared pieces: exit codes and an argument parser that fails without a traceback."""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_BUDGET, EXIT_INVALID, EXIT_INTERNAL = 0, 1, 2, 70


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, without a traceback
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
