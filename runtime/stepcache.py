"""Finished steps shared between the runs of a study, by their key.

A step's key (runtime.runner) digests everything its result depends on: the recipe's shared
settings, the step's config, the data, the training input and the models it reads. Runs of a
study often share steps: every trial of a design search trains the same teacher, and the runs of
a format comparison distil the same student before quantizing it each its own way. The first run
to finish a step publishes its folder here under the key; a later run with the same key links the
files into its own run directory instead of training again. Files are hard links where the file
system allows (no copy of a teacher's weights per trial), else copies; every published folder
appears whole, by one rename, or not at all.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RESULT = "result.json"


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
