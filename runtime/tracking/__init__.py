"""Runs where people already watch them, beside report.json, never instead of it (`--track NAME`,
the `tracking` extra):
- tensorboard: event files in the run directory (tensorboard_events.py);
- mlflow: a run in MLflow's tracking store, a nested run per step (mlflow_runs.py).

A tracker has start(recipe_text, spec_text, budgets, params), epoch(label, row), step(index, entry)
and close(error); the runner calls them and knows no tracker by name.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from compiler.errors import NcError

EXTRA = "pip install -e '.[tracking]'"
LIBRARY = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracker -> the package it needs
TRACKERS = tuple(LIBRARY)


def require(names: tuple[str, ...]) -> None:
    """Known trackers whose libraries are installed, or an error that names the extra."""
    unknown = [n for n in names if n not in LIBRARY]
    if unknown:
        raise NcError(f"--track {unknown[0]}: unknown tracker; known: {', '.join(TRACKERS)}")
    for name in dict.fromkeys(names):
        if importlib.util.find_spec(LIBRARY[name]) is None:
            raise NcError(f"--track {name}: the {LIBRARY[name]} package is not installed; {EXTRA}")


def trackers(names: tuple[str, ...], out: Path, parent: str | None = None) -> list:
    """The run's trackers. `parent`: the MLflow run this one nests under (a study's)."""
    require(names)
    made = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            from .tensorboard_events import TensorBoard

            made.append(TensorBoard(out))
        else:
            from .mlflow_runs import MLflowRun

            made.append(MLflowRun(out, parent))
    return made
