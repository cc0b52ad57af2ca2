"""`nccompile SPEC`: compile a spec, print its summary and check its budgets.

Exit codes: 0 every budget holds, 1 a budget is exceeded, 2 invalid spec or usage.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import NcError, SpecError, UsageError

EXIT_OK, EXIT_BUDGET, EXIT_INVALID, EXIT_INTERNAL = 0, 1, 2, 70


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, without a traceback
        self.print_usage(sys.stderr)
        print(f"nccompile: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)


def _arg_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nccompile", description="Compile a model spec, summarize it and check its budgets "
                                                "before any training.")
    p.add_argument("spec", help="a .spec (DSL) or .yaml/.yml spec file")
    p.add_argument("--model", help="which model, when the file defines several")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a model parameter (repeatable), e.g. --param classes=10")
    p.add_argument("--input", metavar="CxHxW", help="override the input shape, e.g. --input 3x32x32")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--depth", type=int, metavar="N", help="show table rows down to this nesting depth")
    return p


def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param expects NAME=VALUE, got `{item}`")
        out[name.strip()] = value.strip()
    return out


def run(argv: list[str]) -> int:
    from . import analyse, compile_spec, parse_shape
    from .report import table, to_json

    args = _arg_parser().parse_args(argv)
    shape = parse_shape(args.input) if args.input else None
    model = compile_spec(args.spec, model=args.model, params=_params(args.param), input_shape=shape)
    analysis = analyse(model)
    print(to_json(analysis) if args.json else table(analysis, args.depth))
    return EXIT_OK if analysis.ok else EXIT_BUDGET


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except NcError as err:
        # Spec errors carry their own `file:line:col: error:` prefix.
        print(str(err) if isinstance(err, SpecError) else f"nccompile: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("nccompile: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in nccompile, not bad input
        if os.environ.get("NCCOMPILE_DEBUG"):
            raise
        print(f"nccompile: internal error: {type(err).__name__}: {err}\n"
              "  hint: this is a bug in nccompile; rerun with NCCOMPILE_DEBUG=1 for the traceback and report it",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
