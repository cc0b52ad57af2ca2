"""`python -m runtime` and the `nccompile` command. Only the standard library loads before the guard:
a Ctrl-C while the compiler, pydantic and torch are still importing is an interrupt, not a traceback."""
import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("nccompile: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
