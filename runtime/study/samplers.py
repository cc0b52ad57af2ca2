"""Optuna's samplers and pruners as a study's search uses them: seeded apart per worker, and
told which of a space's values are an ordered range and which are choices."""
from __future__ import annotations

import math
import os
import socket
import zlib

import optuna

from ..recipe import SEED_END
from .config import StudyConfig


def even_step(values: list):
    """The step of a range of numbers (`8..64 step 8`), which the samplers treat as ordered; None for
    other values (`[4, 8, 16, 48]`, booleans, text), which are choices: a range over them would draw
    values the space does not hold."""
    if len(values) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    step = values[1] - values[0]
    even = all(math.isclose(b - a, step, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(values, values[1:]))
    return step if even and step > 0 else None


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid, without its `study.stop()` once every point is drawn: that works only inside
    `study.optimize`, and this engine asks and tells (it stops at the trials it wants, the grid's size
    at most: see Study.validate)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def worker_seed(seed: int, shared_storage: bool) -> int:
    """The sampler's seed in this worker: the study's for the first local worker, apart for the others
    (spawned with an index) and for each machine sharing a database; identically seeded workers draw
    the same configurations, each then run twice."""
    offset = int(os.environ.get("NCCOMPILE_WORKER_INDEX", "0") or 0)
    if shared_storage:
        offset += zlib.crc32(socket.gethostname().encode())
    return (seed + offset) % SEED_END


def sampler_for(cfg: StudyConfig, space_values: dict, trials: int, shared_storage: bool):
    s = cfg.search
    seed = worker_seed(s.seed if s else 0, shared_storage)
    if s is None or s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        return _Grid({k: list(v) for k, v in space_values.items()}, seed=seed)
    # a few random trials first, then TPE's model (Optuna's default waits 10: most studies here are shorter)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, trials // 3))


def pruner_for(cfg: StudyConfig):
    p = cfg.search.pruner if cfg.search else "none"
    if p == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if p == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()
