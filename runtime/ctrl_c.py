"""Ctrl-C told apart from what it breaks. A KeyboardInterrupt raised inside a library's import or a
descriptor's __set_name__ can come out as another exception (a RuntimeError, a RecursionError from a
half-imported module), so the CLI's handler notes that it fired. Standard library only: it is installed
before the compiler, pydantic and torch import."""
import signal

_fired = False


def _note_and_raise(signum, frame):
    global _fired
    _fired = True
    raise KeyboardInterrupt


def install() -> None:
    """Ctrl-C still raises KeyboardInterrupt, and is remembered; a handler someone else set is left alone."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _note_and_raise)


def fired(err: BaseException | None = None) -> bool:
    """Whether `err` is, or followed, a Ctrl-C of this process."""
    return _fired or isinstance(err, KeyboardInterrupt)
