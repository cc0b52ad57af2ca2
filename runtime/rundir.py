"""The run directory: every file written atomically, and the record of finished steps.

    RUN/spec.<ext> RUN/recipe.yaml    what was run (resolved)
    RUN/state.json                    finished steps, keyed by a hash of their inputs
    RUN/report.json RUN/report.md     one entry per step
    RUN/steps/<name>/...              per-step files (model.safetensors, curves.png, ...)
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from compiler.errors import NcError

from .files import atomic_write


def write_json(path: Path, data) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def process_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (locks and study workers left by a crash)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RUN_FILES = frozenset({"spec.spec", "spec.yaml", "spec.yml", "recipe.yaml", "state.json", "report.json",
                       "report.md", "steps", ".nccompile.lock"})
# a run takes its lock, then writes state.json, before anything else: a folder with neither holds no run
RUN_RECORDS = frozenset({".nccompile.lock", "state.json"})


def check_own_folder(out: Path, own: frozenset[str], records: frozenset[str], what: str) -> None:
    """`out` is new, empty, or an earlier `what`'s folder: one of its `records` and only names from `own`.
    Anything else could be overwritten (a user's own recipe.yaml or report.md) or mixed up with it."""
    if out.exists() and not out.is_dir():
        raise NcError(f"--out {out} is a file, not a folder\n  hint: choose a folder for the {what}")
    try:
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError as err:
        raise NcError(f"cannot read the folder {out}: {err.strerror}") from None
    # temporary files of atomic writes (runtime.files) that a killed run left behind are its own too
    names = [n for n in names if not (n.startswith(".") and n.endswith(".tmp"))]
    foreign = [n for n in names if n not in own] if records.intersection(names) else names
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise NcError(f"--out {out} holds files that no {what} wrote ({shown}); nothing was written\n"
                      f"  hint: give a new or empty folder, or the folder of an earlier {what} to resume it")


class RunDirBusy(NcError):
    """Another live run holds the run directory's lock."""


class RunDir:
    def __init__(self, root: Path, writer: bool = True):
        self.root = Path(root)
        self.writer = writer  # only rank 0 writes under torchrun
        self.state_path = self.root / "state.json"
        self.state = {"steps": {}}
        if self.state_path.exists():
            try:
                self.state = json.loads(self.state_path.read_text())
                if not isinstance(self.state, dict) or not isinstance(self.state.get("steps"), dict):
                    raise ValueError("no `steps` mapping")
            except (ValueError, OSError, UnicodeDecodeError) as err:
                raise NcError(f"{self.state_path} is damaged ({err}); it records which steps finished\n"
                              f"  hint: delete it to run every step again, or choose another --out") from None

    def step_dir(self, name: str) -> Path:
        return self.inside(self.root / "steps" / name)

    def inside(self, path: Path) -> Path:
        """`path` if it resolves to a place inside the run directory (names are checked, links are not)."""
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise NcError(f"{path} lies outside the run directory {self.root}; nothing is written there")
        return path

    # --- one run at a time per directory ------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.root / ".nccompile.lock"

    def lock(self) -> None:
        """Take the directory for this run, or a clear error when a live run holds it."""
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.lock_path.read_text(errors="replace").split()
                pid = int(holder[0]) if holder and holder[0].isdigit() else None
                same_host = len(holder) > 1 and holder[1] == socket.gethostname()
                if pid is not None and (not same_host or process_alive(pid)):
                    raise RunDirBusy(f"another nccompile run (pid {pid} on {holder[1] if len(holder) > 1 else '?'}) "
                                  f"is writing to {self.root}\n  hint: wait for it to finish, or choose another "
                                  f"--out; if no run is left, delete {self.lock_path}") from None
                self.lock_path.unlink(missing_ok=True)  # left by a run that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return
        raise NcError(f"cannot take {self.lock_path}")

    def unlock(self) -> None:
        self.lock_path.unlink(missing_ok=True)

    def begin(self) -> None:
        """Record the run before anything else is written, so its folder is known as a run's."""
        if self.writer and not self.state_path.exists():
            write_json(self.state_path, self.state)

    def finished(self, name: str, key: str) -> dict | None:
        entry = self.state["steps"].get(name)
        if not entry or entry.get("key") != key:
            return None
        model_file = entry.get("result", {}).get("model_file")
        if model_file and not (self.root / model_file).exists():
            return None
        return entry

    def mark_finished(self, name: str, key: str, result: dict) -> None:
        self.state["steps"][name] = {"key": key, "result": result}
        if self.writer:
            write_json(self.state_path, self.state)
