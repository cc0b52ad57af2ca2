"""Units a model needs that its latency table lacks, timed into the table in memory: what pruning to a
latency does with the widths it chooses (runtime.steps.prune)."""
from __future__ import annotations

import compiler
from compiler import latency
from compiler.tree import Model

from .measure import unit_ms, unit_spec


def measure_missing(model: Model, target: str, samples: int = 15) -> int:
    """Time on this machine the units of `model` that the latency table for `target` lacks, into the table
    in memory (its file stays as `profile` wrote it: it lies outside the run directory); returns how many.
    Without them a pruned width is estimated from the nearest measured unit: 16 of the student's at 64 px,
    the pruned model predicted 1.4x what it measured on ort-fp32, and origin's 16-channel convs 0.7x on int8.
    Each unit the faster of two timings, as `profile` times it (unit_ms)."""
    table = latency.cached_table(latency.canonical_target(target))
    missing = {u.key: u for u in latency.units_on(model, table.target) if u.key not in table.entries}
    for unit in missing.values():
        one = compiler.compile_source(unit_spec(unit), "unit")
        empty = compiler.compile_source(latency.baseline_spec(unit.in_shape), "unit")
        timed = min((unit_ms(one, empty, table.target, table.threads, table.batch, samples, unit.variant,
                             table.fit.get("step_ms", 0.0)) for _ in range(2)), key=lambda t: t["ms"])
        table.entries[unit.key] = {**timed, "macs": unit.macs, "moved": unit.moved, "structure": unit.structure}
    if missing:
        table.touch()  # what prediction derived from the entries is stale
    return len(missing)
