"""The command line's shared pieces: exit codes and an argument parser that fails without a traceback."""
from __future__ import annotations

import argparse
import sys

from compiler.errors import UsageError

EXIT_OK, EXIT_BUDGET, EXIT_INVALID, EXIT_INTERNAL = 0, 1, 2, 70


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, without a traceback
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, refusing empty values: `--out "$OUT"` with OUT unset ran into the default
        folder, `--data ""` trained on the default data, `--recipe ""` trained nothing."""
        parsed = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if any(v == "" for v in (value if isinstance(value, list) else [value])):
                name = action.option_strings[-1] if action.option_strings else action.dest
                raise UsageError(f"{name} is empty (an unset variable?); give a value, or leave it out")
        return parsed
