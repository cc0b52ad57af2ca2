"""A model's latency from a table: each unit's entry (its in-model time, its time alone, or its nearest
unit's moved along fitted slopes), the measured overhead, and the fitted per-unit (or, on PyTorch, per
element moved) and scale terms."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..ops import fmt_shape
from ..tree import Model
from .tables import FIRST_CONV_FLOAT, RAW_UNIT_INPUTS, LatencyError, Table, canonical_target
from .units import Unit, target_units

IN_MODEL = "measured in a model"  # an entry from ORT's profiler inside whole models, not the unit alone


def scales(fit: dict) -> tuple[float, float]:
    """(for units timed alone, for units timed inside models): the two are different instruments, each
    fitted on the whole models measured (runtime.profile.fit). A table fitted before the split has one."""
    return fit.get("alone_scale", fit["scale"]), fit["scale"]


def _over(unit: Unit, above: int) -> bool:
    """Whether a fitted term with a threshold of `above` input elements reaches `unit`."""
    return math.prod(unit.in_shape) > above


def fitted(fit: dict, unit: Unit) -> bool:
    """Whether the fit's scales and per-unit terms reach `unit`: over its `raw_unit_inputs` input elements
    (every unit in a fit that has none)."""
    return _over(unit, fit.get("raw_unit_inputs", 0))


def unit_scale(fit: dict, unit: Unit, how: str) -> float:
    """The fitted scale on one unit's entry: 1 where the fit does not reach it (`fitted`), else the in-model
    one, or the one for units alone where the unit is over the fit's `alone_scale_above` input elements (1
    below it)."""
    alone_scale, in_model_scale = scales(fit)
    if not fitted(fit, unit):
        return 1.0
    if how == IN_MODEL:
        return in_model_scale
    return alone_scale if _over(unit, fit.get("alone_scale_above", 0)) else 1.0


def scaled_sum(rows: list[tuple[Unit, float]], above: int) -> tuple[float, float]:
    """(the entries of units over `above` input elements, the others'): what a fit's scale for units alone
    reaches, and what it passes by."""
    over = sum(ms for unit, ms in rows if _over(unit, above))
    return over, sum(ms for _, ms in rows) - over


@dataclass
class Prediction:
    ms: float                 # the model's predicted latency
    units: list[tuple[Unit, float, str]]  # (unit, its entry in ms, how: IN_MODEL | "measured" | "nearest KEY")
    table: Table

    @property
    def estimated(self) -> int:
        return sum(1 for _, _, how in self.units if how.startswith("nearest"))

    def by_path(self) -> dict[str, float]:
        """Each layer's share of the prediction (a unit's time on its first layer)."""
        out: dict[str, float] = {}
        for unit, ms, how in self.units:
            if unit.paths:
                out[unit.paths[0]] = out.get(unit.paths[0], 0.0) + ms * unit_scale(self.table.fit, unit, how)
        return out

    def to_json(self) -> dict:
        return {"ms": self.ms, "table": str(self.table.path), "target": self.table.target,
                "threads": self.table.threads, "batch": self.table.batch, "units": len(self.units),
                "estimated_units": self.estimated}


def _derived(table: Table) -> dict:
    """What prediction reads from the entries again and again, indexed once per table (Table.touch()
    forgets it): the entries by structure, and fitted slopes as asked for."""
    d = table.derived
    if not d:
        d["by_structure"] = by_structure = {}
        for key, e in table.entries.items():
            by_structure.setdefault(e.get("structure", ""), []).append((key, e))
        d["slopes"] = {}
        # the input size of each whole model measured: in-model times are taken from the nearest (in_context)
        d["sizes"] = {label: c["inputs"] for label, c in table.fit.get("models", {}).items() if c.get("inputs")}
    return d


def _slopes(table: Table, structure: str) -> tuple[float, float] | None:
    """Milliseconds per MAC and per element moved for units of `structure`: a least-squares fit of
    ms = a + b macs + c moved over the table's units of that structure (None below 4 of them, or where a
    slope comes out negative)."""
    cache = _derived(table)["slopes"]
    if structure in cache:
        return cache[structure]
    rows = [(1.0, e["macs"], e["moved"], e["ms"]) for _, e in _derived(table)["by_structure"].get(structure, [])]
    found = None
    if len(rows) >= 4:
        cols = [c for c in (0, 1, 2) if any(r[c] != rows[0][c] for r in rows) or c == 0]
        scale = [max(abs(r[c]) for r in rows) or 1.0 for c in cols]
        a = [[sum(r[i] * r[j] for r in rows) / (si * sj) for j, sj in zip(cols, scale)] for i, si in zip(cols, scale)]
        b = [sum(r[i] * r[3] for r in rows) / si for i, si in zip(cols, scale)]
        x = _solve(a, b)
        if x is not None:
            coef = dict(zip(cols, (v / si for v, si in zip(x, scale))))
            per_mac, per_moved = coef.get(1, 0.0), coef.get(2, 0.0)
            if per_mac >= 0 and per_moved >= 0:
                found = (per_mac, per_moved)
    cache[structure] = found
    return found


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None for a singular system."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    for i in range(n):
        pivot = max(range(i, n), key=lambda r: abs(m[r][i]))
        if abs(m[pivot][i]) < 1e-12:
            return None
        m[i], m[pivot] = m[pivot], m[i]
        for r in range(i + 1, n):
            f = m[r][i] / m[i][i]
            m[r] = [x - f * y for x, y in zip(m[r], m[i])]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (m[i][n] - sum(m[i][j] * x[j] for j in range(i + 1, n))) / m[i][i]
    return x


def entry_ms(unit: Unit, table: Table, inputs: int | None = None) -> tuple[float, str]:
    """The unit's time in a model of `inputs` input elements (in_context; for a unit of up to RAW_UNIT_INPUTS
    timed by the clock, the mean of that and its time alone): measured, else from the nearest
    measured unit of its structure, moved along that structure's fitted cost per MAC and per element
    moved (or, with too few of them to fit, scaled by the ratio of MACs, or of bytes moved for units
    without MACs)."""
    hit = table.entries.get(unit.key)
    if hit is not None:
        ms = in_context(hit, inputs, _derived(table)["sizes"])
        if hit.get("ctx") and hit.get("clock") == "wall" and math.prod(unit.in_shape) <= RAW_UNIT_INPUTS:
            ms = (ms + float(hit["ms"])) / 2  # two instruments of a tiny unit's cost, neither better (tables.py)
        return ms, IN_MODEL if hit.get("ctx") else "measured"
    structure = unit.structure
    best, best_distance = None, math.inf
    for key, e in _derived(table)["by_structure"].get(structure, []):
        distance = abs(math.log((e["macs"] + 1) / (unit.macs + 1))) + abs(math.log((e["moved"] + 1) / (unit.moved + 1)))
        if distance < best_distance:
            best, best_distance = (key, e), distance
    if best is None:
        raise LatencyError(f"the latency table {table.path} has no unit like `{unit.text}` (input "
                           f"{fmt_shape(unit.in_shape)})\n  hint: nccompile profile --target {table.target} "
                           "--specs SPEC measures what a spec needs")
    key, e = best
    slopes = _slopes(table, structure)
    if slopes is not None:
        per_mac, per_moved = slopes
        moved = float(e["ms"]) + per_mac * (unit.macs - e["macs"]) + per_moved * (unit.moved - e["moved"])
        alone = max(moved, float(e["ms"]) * min(1.0, (unit.moved + 1) / (e["moved"] + 1)))
    else:
        alone = float(e["ms"]) * (unit.macs / e["macs"] if unit.macs and e["macs"]
                                  else (unit.moved + 1) / (e["moved"] + 1))
    return alone, f"nearest {key}"


def in_context(entry: dict, inputs: int | None = None, sizes: dict[str, int] | None = None) -> float:
    """A measured unit's time inside a model of `inputs` input elements: its in-model time (ORT's profiler)
    in the profiled models of the nearest input size (`sizes`: each model's; the mean of those at that
    size), else its time alone (on ORT the same kernels' time, net of the reorders a unit alone pays).
    The nearest, since a unit costs more after large layers than after small ones: an SE block's 1x1
    convs take 1-2 us in the student at 32 px and 8-10 us at 256, their weights evicted from the cache."""
    ctx = entry.get("ctx") or {}
    if not ctx:
        return float(entry["ms"])
    if inputs and sizes and all(sizes.get(label) for label in ctx):
        distance = {label: abs(math.log(sizes[label] / inputs)) for label in ctx}
        nearest = min(distance.values())
        ctx = {label: ms for label, ms in ctx.items() if distance[label] <= nearest + 1e-9}
    return sum(ctx.values()) / len(ctx)


def overhead_ms(table: Table, in_shape: tuple) -> float:
    """What a run costs beyond its units: the empty model's time at this input size (feeding the input)."""
    return overhead_at(table.fit, math.prod(in_shape))


def overhead_at(fit: dict, inputs: int) -> float:
    """The empty model's time for `inputs` input elements: through the empty models measured
    (`overhead_points`, [inputs, ms]), flat below the smallest (a call's fixed cost; the fitted line's
    intercept is 20% under it at a few hundred elements), along the fitted cost per element above the
    largest; without points, the fitted line (`overhead_ms` + `overhead_ms_per_input` x inputs)."""
    slope = fit.get("overhead_ms_per_input", 0.0)
    points = sorted(fit.get("overhead_points") or [])
    if not points:
        return fit["overhead_ms"] + slope * inputs
    if inputs <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if inputs <= x1:
            return y0 + (y1 - y0) * (inputs - x0) / (x1 - x0)
    return points[-1][1] + slope * (inputs - points[-1][0])


def units_on(model: Model, target: str) -> list[Unit]:
    """The model's units as `target` runs them (an int8 file's first conv in float)."""
    return target_units(model, canonical_target(target) in FIRST_CONV_FLOAT)


def per_unit_counts(units: list[Unit], above: int) -> int:
    """How many of the units a fitted per-unit term reaches: those of more than `above` input elements (a
    fit's `*_per_unit_above`, SMALL_UNIT_INPUTS or 0 for every unit)."""
    return sum(1 for unit in units if _over(unit, above))


def cold_weights(units: list[Unit], alone: list[Unit], above: int | None) -> int:
    """The weights (elements) of the `alone` units that a model of `units` reads from memory on each run:
    all of them where its units move over `above` elements in all (a fit's `cold_above`), none below it or
    where the fit found no such size."""
    if above is None or sum(unit.moved for unit in units) <= above:
        return 0
    return sum(unit.weights for unit in alone)


def predict(model: Model, table: Table) -> Prediction:
    rows = []
    inputs = math.prod(model.input_shape)
    for unit in units_on(model, table.target):
        ms, how = entry_ms(unit, table, inputs)
        rows.append((unit, ms, how))
    f = table.fit
    alone = [unit for unit, _, how in rows if how != IN_MODEL and fitted(f, unit)]
    inside = [unit for unit, _, how in rows if how == IN_MODEL and fitted(f, unit)]
    in_model = sum(ms * unit_scale(f, unit, how) for unit, ms, how in rows if how == IN_MODEL)
    raw = sum(ms * unit_scale(f, unit, how) for unit, ms, how in rows if how != IN_MODEL)
    extra = (f.get("per_unit_ms", 0.0) * len(rows)
             + f.get("alone_per_unit_ms", 0.0) * per_unit_counts(alone, f.get("alone_per_unit_above", 0))
             + f.get("in_model_per_unit_ms", 0.0) * per_unit_counts(inside, f.get("in_model_per_unit_above", 0)))
    if f.get("cold_ms_per_weight"):  # units alone ran with their weights in the cache
        extra += f["cold_ms_per_weight"] * cold_weights([unit for unit, _, _ in rows], alone, f.get("cold_above"))
    if f.get("per_moved_ms"):  # PyTorch's (profile.fit); search predicts thousands of models on ORT without it
        extra += f["per_moved_ms"] * sum(unit.moved for unit, _, _ in rows)
    # a negative correction never takes more than half of what the units measured
    total = overhead_ms(table, model.input_shape) + max(in_model + raw + extra, (in_model + raw) / 2)
    return Prediction(total, rows, table)
