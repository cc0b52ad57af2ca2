"""`python -m runtime` and the `nccompile` command. Only the standard library loads before the guard:
a Ctrl-C while the compiler, pydantic and torch are still importing is an interrupt, not a traceback."""
import sys

from . import ctrl_c

INTERRUPTED = 130


def main() -> int:
    ctrl_c.install()
    try:
        from .cli import main as cli_main
    except BaseException as err:  # an interrupted import can surface as another exception
        if not ctrl_c.fired(err):
            raise
        print("nccompile: interrupted", file=sys.stderr)
        code = INTERRUPTED
    else:
        code = cli_main()
    if code == INTERRUPTED:
        # CPython flags a Ctrl-C that passes through an exec/eval (namedtuple, pydantic's imports do them) and
        # kills itself with SIGINT at exit even though we caught it; any later exec clears the flag.
        exec("pass")
    return code


if __name__ == "__main__":
    sys.exit(main())
