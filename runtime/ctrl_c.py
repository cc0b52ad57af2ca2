"""Ctrl-C told apart from what it breaks. A KeyboardInterrupt raised inside a library's import or a
descriptor's __set_name__ can come out as another exception (a RuntimeError, a RecursionError from a
half-imported module), so the CLI's handler notes that it fired. Standard library only: it is installed
before the compiler, pydantic and torch import.

Inside the imports of torch, torchvision and onnxruntime, Ctrl-C waits until the import ends: their C++ start-up calls
back into Python (torch's `_c10d_init`), and a KeyboardInterrupt raised there cannot unwind through C++
(pybind11 aborts the process: "terminate called after throwing ... KeyboardInterrupt")."""
import contextlib
import importlib.abc
import signal
import sys

_fired = False
_HELD_IMPORTS = frozenset({"torch", "torchvision", "onnxruntime"})


def _note_and_raise(signum, frame):
    global _fired
    _fired = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def held():
    """Ctrl-C stays pending in the kernel while the block runs and is raised as usual when it ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _HoldWhileImporting(importlib.abc.MetaPathFinder):
    """Runs the top-level import of the packages in _HELD_IMPORTS inside `held()`."""

    def find_spec(self, name, path=None, target=None):
        if name not in _HELD_IMPORTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            run = loader.exec_module

            def exec_module(module):
                with held():
                    run(module)

            loader.exec_module = exec_module  # this package's loader object only
        return spec


def install() -> None:
    """Ctrl-C still raises KeyboardInterrupt, and is remembered; a handler someone else set is left alone."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _note_and_raise)
    if not any(isinstance(f, _HoldWhileImporting) for f in sys.meta_path):
        sys.meta_path.insert(0, _HoldWhileImporting())


def fired(err: BaseException | None = None) -> bool:
    """Whether `err` is, or followed, a Ctrl-C of this process."""
    return _fired or isinstance(err, KeyboardInterrupt)
