"""Finished steps shared between the runs of a study, by their key.

A step's key (runtime.run.runner) digests everything its result depends on: the recipe's shared
settings, the step's config, the data, the training input and the models it reads. Runs of a
study often share steps: every trial of a design search trains the same teacher, and the runs of
a format comparison distil the same student before quantizing it each its own way. The first run
to finish a step publishes its folder here under the key; a later run with the same key links the
files into its own run directory instead of training again. Files are hard links where the file
system allows (no copy of a teacher's weights per trial), else copies; every published folder
appears whole, by one rename, or not at all. A run about to run a step claims its key first; a run
of the same machine that finds the key claimed by a live run waits for it to be published rather
than train the same thing beside it (two workers starting a search both want the teacher).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from ..rundir import process_alive

RESULT = "result.json"
POLL_SECONDS = 2.0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the run's files are replaced by rename, never rewritten: a link stays valid
    except OSError:
        shutil.copy2(src, dst)


def lookup(cache: Path, key: str, step_dir: Path) -> dict | None:
    """The stored result of a step published under `key`, its files linked into `step_dir`; None if
    no complete entry is there."""
    entry = cache / key
    try:
        stored = json.loads((entry / RESULT).read_text())
    except (OSError, ValueError):
        return None
    try:
        if step_dir.exists():
            shutil.rmtree(step_dir)  # what an interrupted attempt left: the shared result replaces it
        step_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(entry / "step", step_dir, copy_function=_link_or_copy)
    except OSError:  # a disk full, a damaged entry: the step runs as if nothing were shared
        shutil.rmtree(step_dir, ignore_errors=True)
        return None
    return stored


def publish(cache: Path, key: str, step_dir: Path, stored: dict) -> None:
    """Share a finished step's folder and result under `key` (a key already there is kept)."""
    if (cache / key).exists():
        return
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if step_dir.exists():
            shutil.copytree(step_dir, tmp / "step", copy_function=_link_or_copy)
        else:  # a step that writes no files (evaluate writes them, but one day one may not)
            (tmp / "step").mkdir(parents=True)
        (tmp / RESULT).write_text(json.dumps(stored))
        os.rename(tmp, cache / key)
    except OSError:  # another run published it first, or the disk is full: sharing is only a saving
        shutil.rmtree(tmp, ignore_errors=True)


def _claim_path(cache: Path, key: str) -> Path:
    return cache / f".{key}.claim"


def _try_claim(cache: Path, key: str) -> bool:
    cache.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(_claim_path(cache, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}")
    return True


def _holder(cache: Path, key: str) -> str:
    """Who holds the key's claim: `live` (a live run of this machine), `remote` (another machine's, whose
    life cannot be checked from here) or `none` (released meanwhile, or its run died: removed)."""
    path = _claim_path(cache, key)
    try:
        holder = path.read_text().split()
    except OSError:
        return "none"
    if len(holder) > 1 and holder[1] != socket.gethostname():
        return "remote"
    pid = int(holder[0]) if holder and holder[0].isdigit() else None
    if pid is not None and pid != os.getpid() and process_alive(pid):
        return "live"
    path.unlink(missing_ok=True)
    return "none"


def obtain(cache: Path, key: str, step_dir: Path, log: Callable[[str], None]) -> dict | None:
    """The step's published result, linked into `step_dir`, waiting while another live run of this
    machine runs it; None when this run is to run it (holding the claim, unless another machine's
    run does: `release` after either way)."""
    said = False
    while True:
        found = lookup(cache, key, step_dir)
        if found is not None:
            return found
        try:
            if _try_claim(cache, key):
                return None
        except OSError:  # an unwritable cache: run the step without sharing it
            return None
        holder = _holder(cache, key)
        if holder == "remote":
            return None
        if holder == "live":
            if not said:
                log(f"{step_dir.name}: another run of the study is running this step (same inputs); waiting for it")
                said = True
            time.sleep(POLL_SECONDS)


def release(cache: Path, key: str) -> None:
    """Give up this run's claim on `key` (after publishing, or when the step failed)."""
    path = _claim_path(cache, key)
    try:
        if path.read_text() == f"{os.getpid()} {socket.gethostname()}":
            path.unlink()
    except OSError:
        pass
