"""Latency predicted from the spec, without torch: the model as units, each looked up in a table that
`nccompile profile` measured on the target machine.

A unit is what a runtime runs as one piece: a conv or linear with the BatchNorm and activation that
follow it (ONNX Runtime fuses them into one kernel), a pool, a residual's add, a join. Its key is its
layers as DSL text at its input shape, so the profiler compiles each unit as a one-unit spec and times
it. On ONNX Runtime the profiler also runs the whole models it measures under ORT's own profiler and
gives each unit its time inside them (node names are layer paths, so fused kernels map back to units):
a unit's entry is its in-model time where known, else its time alone times its structure's in-model /
alone ratio. Prediction = overhead + per_unit x units + scale x (sum of the units' entries); the three
are fitted by the profiler on the whole models (session overhead, the profiler's own cost per node).

A unit the table lacks takes the nearest measured unit of the same structure (the key with every
number masked) by MACs and bytes moved, moved along that structure's cost per MAC and per element moved
(fitted over its measured units; with fewer than 4 of them, scaled by the ratio of MACs, or of bytes
moved for units without MACs); with no unit of that structure the prediction is refused and says to
profile the spec.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NcError
from .ops import fmt_shape
from .tree import Model, Node

TARGETS = {"ort-fp32": "onnxruntime", "torch-fp32": "torch"}  # target -> the library whose version counts
ALIASES = {"ort-weights": "ort-fp32"}  # the `weights` export runs on the float graph's kernels after folding
TABLE_FORMAT, TABLE_VERSION = "nccompile-latency", 1
FUSED_AFTER = {"conv": ("bn", "act"), "linear": ("act",)}  # what a compute layer's unit takes in, in order
FREE = {"identity", "dropout", "droppath"}  # no work at inference: joins the unit before it
SHRINK = 50  # units of prior weight on the overall in-model / alone ratio (context_ratio; bench_latency)


class LatencyError(NcError):
    """No usable latency table: missing, for another target or machine, or lacking a unit's structure."""


@dataclass(frozen=True)
class Unit:
    text: str           # the unit's layers as DSL: "conv(32, kernel=3, stride=2) bn act(relu6)"
    in_shape: tuple     # one sample's input
    macs: int
    moved: int          # elements read and written: input, output and weights
    paths: tuple = ()   # the model's layers it covers

    @property
    def key(self) -> str:
        return f"{self.text} @ {fmt_shape(self.in_shape)}"

    @property
    def structure(self) -> str:
        return re.sub(r"\d+(\.\d+)?", "#", self.text)

    def spec(self) -> str:
        """A one-unit spec the profiler compiles and times (a flat input enters as Cx1x1, then `flatten`)."""
        if len(self.in_shape) == 1:
            return f"model unit {{\n    input {self.in_shape[0]}x1x1\n    flatten {self.text}\n}}\n"
        return f"model unit {{\n    input {fmt_shape(self.in_shape)}\n    {self.text}\n}}\n"


def baseline_spec(in_shape: tuple) -> str:
    """The one-unit spec of no work at `in_shape`: its time (session call, feeding the input) is taken off
    each unit's, since a whole model pays it once."""
    return Unit("identity", tuple(in_shape), 0, 0).spec()


def _leaf_text(node: Node) -> str:
    from .emit import leaf

    return leaf(node)


def _unit(nodes: list[Node], text: str | None = None, in_shape: tuple | None = None) -> Unit:
    in_shape = in_shape or nodes[0].in_shape
    weights = sum(t.numel for n in nodes for _, t in n.state_tensors())
    return Unit(text or " ".join(_leaf_text(n) for n in nodes), tuple(in_shape), sum(n.macs for n in nodes),
                math.prod(in_shape) + math.prod(nodes[-1].out_shape) + weights, tuple(n.path for n in nodes))


def units(model: Model) -> list[Unit]:
    """The model's units in execution order."""
    out: list[Unit] = []
    _walk(model.root, out)
    return out


def _walk(node: Node, out: list[Unit]) -> None:
    if node.op == "seq":
        pending: list[Node] = []
        for child in node.children:
            if child.children:
                _flush(pending, out)
                _walk(child, out)
            elif pending and (child.op in FREE or child.op in _takes(pending)):
                pending.append(child)
            else:
                _flush(pending, out)
                pending.append(child)
        _flush(pending, out)
    elif node.op == "residual":
        for child in node.children:
            _walk(child, out)
        out.append(_unit([node], "residual { identity }", node.out_shape))
    elif node.op == "join":
        for child in node.children:
            _walk(child, out)
        out.append(_join_unit(node))
    elif node.op == "torchvision":  # a torchvision model is one unit: its parts are no layers of ours
        out.append(_unit([node]))
    elif node.children:  # any other container: its parts
        for child in node.children:
            _walk(child, out)
    else:
        out.append(_unit([node]))


def _takes(pending: list[Node]) -> tuple:
    """The ops the pending unit can still take in (a conv takes a bn, then an act)."""
    after = FUSED_AFTER.get(pending[0].op, ())
    last = max((after.index(n.op) for n in pending[1:] if n.op in after), default=-1)
    return after[last + 1:]


def _flush(pending: list[Node], out: list[Unit]) -> None:
    if pending:
        out.append(_unit(list(pending)))
        pending.clear()


def _join_unit(node: Node) -> Unit:
    """The join's own work (split, concat or element-wise), timed on identity branches: concat of
    branches of other widths is timed as split + concat of the same widths."""
    a = node.attrs
    mode = "mul" if a.get("gate") else a["mode"]
    h_w = tuple(node.out_shape[1:])
    if mode == "concat":
        widths = a.get("split") or [c.out_shape[0] for c in node.children]
        text = f"concat split({', '.join(map(str, widths))})" + " { identity }" * len(widths)
        shape = (sum(widths), *h_w)
    else:
        text = f"{mode}" + " { identity }" * max(2, len(node.children) - (1 if a.get("gate") else 0))
        shape = tuple(node.out_shape)
    return Unit(text, shape, 0, 2 * math.prod(shape), (node.path,))


# --- tables ----------------------------------------------------------------------------------

def canonical_target(name: str) -> str:
    return ALIASES.get(name, name)


def machine() -> dict[str, object]:
    """What a table's numbers depend on besides the libraries: the CPU and its core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "system": platform.system()}


def library_version(target: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TARGETS[target])
    except PackageNotFoundError:
        return None


def table_path(target: str, explicit: str | None = None) -> Path:
    """Where the table of `target` lives: `explicit`, else TARGET.json in $NCCOMPILE_LATENCY_DIR, else in
    the cache folder's latency/ ($NCCOMPILE_CACHE_DIR, else ~/.cache/nccompile)."""
    if explicit:
        return Path(explicit)
    folder = os.environ.get("NCCOMPILE_LATENCY_DIR")
    if not folder:
        base = os.environ.get("NCCOMPILE_CACHE_DIR") or str(
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nccompile")
        folder = str(Path(base) / "latency")
    return Path(folder) / f"{canonical_target(target)}.json"


@dataclass
class Table:
    path: Path
    target: str
    threads: int
    batch: int
    machine: dict
    libraries: dict
    fit: dict = field(default_factory=lambda: {"overhead_ms": 0.0, "per_unit_ms": 0.0, "scale": 1.0})
    entries: dict = field(default_factory=dict)  # key -> {"ms", "macs", "moved"}

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "target": self.target, "threads": self.threads,
                "batch": self.batch, "machine": self.machine, "libraries": self.libraries, "fit": self.fit,
                "entries": self.entries}

    def describe(self) -> str:
        return (f"{self.path} ({self.target}, {self.threads} thread{'s' * (self.threads != 1)}, "
                f"batch {self.batch}, {len(self.entries):,} units)")


def load_table(target: str, path: str | Path | None = None, check: bool = True) -> Table:
    """The table for `target`, refused when it was measured for another target, machine or library version."""
    target = canonical_target(target)
    where = table_path(target, str(path) if path else None)
    hint = f"\n  hint: measure one on this machine: nccompile profile --target {target}"
    if not where.is_file():
        raise LatencyError(f"no latency table for {target} at {where}{hint} (then `--specs SPEC...` to add "
                           "what your specs use)")
    try:
        raw = json.loads(where.read_text())
    except (OSError, ValueError) as err:
        raise LatencyError(f"{where}: not a latency table ({err}){hint}") from None
    if not isinstance(raw, dict) or raw.get("format") != TABLE_FORMAT:
        raise LatencyError(f"{where}: not a latency table (no `format: {TABLE_FORMAT}`){hint}")
    if raw.get("version") != TABLE_VERSION:
        raise LatencyError(f"{where}: latency table version {raw.get('version')}, this nccompile reads "
                           f"{TABLE_VERSION}{hint}")
    table = Table(where, raw["target"], raw["threads"], raw["batch"], raw["machine"], raw["libraries"],
                  raw.get("fit", {"overhead_ms": 0.0, "scale": 1.0}), raw.get("entries", {}))
    if check:
        if table.target != target:
            raise LatencyError(f"{where} was measured for {table.target}, not {target}{hint}")
        here, lib = machine(), TARGETS[target]
        if table.machine.get("cpu") != here["cpu"] or table.machine.get("cores") != here["cores"]:
            raise LatencyError(f"{where} was measured on another machine ({table.machine.get('cpu')}, "
                               f"{table.machine.get('cores')} cores; this one: {here['cpu']}, {here['cores']} "
                               f"cores){hint}")
        if table.libraries.get(lib) != library_version(target):
            raise LatencyError(f"{where} was measured with {lib} {table.libraries.get(lib)}, this machine has "
                               f"{library_version(target)}{hint}")
    return table


_LOADED: dict[tuple, Table] = {}


def cached_table(target: str) -> Table:
    """load_table for the default place, read once per file version (a search predicts thousands of models)."""
    path = table_path(target)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    key = (str(path), stamp, canonical_target(target))
    if key not in _LOADED:
        _LOADED[key] = load_table(target, path)
    return _LOADED[key]


# --- prediction ------------------------------------------------------------------------------

@dataclass
class Prediction:
    ms: float                 # the model's predicted latency
    units: list[tuple[Unit, float, str]]  # (unit, its entry in ms, how: "measured" | "nearest KEY")
    table: Table

    @property
    def estimated(self) -> int:
        return sum(1 for _, _, how in self.units if how != "measured")

    def by_path(self) -> dict[str, float]:
        """Each layer's share of the prediction (a unit's time on its first layer)."""
        out: dict[str, float] = {}
        for unit, ms, _ in self.units:
            if unit.paths:
                out[unit.paths[0]] = out.get(unit.paths[0], 0.0) + ms * self.table.fit["scale"]
        return out

    def to_json(self) -> dict:
        return {"ms": self.ms, "table": str(self.table.path), "target": self.table.target,
                "threads": self.table.threads, "batch": self.table.batch, "units": len(self.units),
                "estimated_units": self.estimated}


def _slopes(table: Table, structure: str) -> tuple[float, float] | None:
    """Milliseconds per MAC and per element moved for units of `structure`: a least-squares fit of
    ms = a + b macs + c moved over the table's units of that structure (None below 4 of them, or where a
    slope comes out negative). Cached on the table."""
    cache = table.__dict__.setdefault("_slopes", {})
    if (structure, len(table.entries)) in cache:
        return cache[structure, len(table.entries)]
    rows = [(1.0, e["macs"], e["moved"], e["ms"]) for e in table.entries.values() if e.get("structure") == structure]
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
    cache[structure, len(table.entries)] = found
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


def entry_ms(unit: Unit, table: Table) -> tuple[float, str]:
    """The unit's time: measured, else from the nearest measured unit of its structure, moved along that
    structure's fitted cost per MAC and per element moved (or, with too few of them to fit, scaled by the
    ratio of MACs, or of bytes moved for units without MACs)."""
    hit = table.entries.get(unit.key)
    if hit is not None:
        return in_context(hit, table), "measured"
    structure = unit.structure
    best, best_distance = None, math.inf
    for key, e in table.entries.items():
        if e.get("structure") != structure:
            continue
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
    return alone * context_ratio(table, structure), f"nearest {key}"


def in_context(entry: dict, table: Table) -> float:
    """A measured unit's time inside models: its own in-model time where a profiled model had it, else
    its time alone times its structure's in-model / alone ratio."""
    ctx = entry.get("ctx") or {}
    if ctx:
        return sum(ctx.values()) / len(ctx)
    return float(entry["ms"]) * context_ratio(table, entry.get("structure", ""))


def context_ratio(table: Table, structure: str) -> float:
    """In-model time over time alone, summed over the structure's units measured both ways; for a
    structure no profiled model had, the same over every unit (1 when no model was profiled): a conv's
    fused add, an activation ORT folds into its conv, reorders a unit alone pays, the profiler's cost."""
    cache = table.__dict__.setdefault("_ratios", {})
    stamp = (len(table.entries), sum(len(e.get("ctx") or {}) for e in table.entries.values()))
    if cache.get("stamp") != stamp:
        cache.clear()
        cache["stamp"] = stamp
        sums: dict[str, list[float]] = {}
        for e in table.entries.values():
            if e.get("ctx") and e["ms"] > 0:
                for key in (e.get("structure", ""), "*"):
                    both = sums.setdefault(key, [0.0, 0.0, 0])
                    both[0] += sum(e["ctx"].values()) / len(e["ctx"])
                    both[1] += e["ms"]
                    both[2] += 1
        overall = sums["*"][0] / sums["*"][1] if "*" in sums and sums["*"][1] > 0 else 1.0
        # a structure seen in few units leans on the overall ratio: its in-model time depends on its
        # neighbours (what ORT fuses it with), which a few units do not average out
        cache["ratios"] = {k: (n * c / a + SHRINK * overall) / (n + SHRINK)
                           for k, (c, a, n) in sums.items() if a > 0}
        cache["overall"] = overall
    return cache["ratios"].get(structure, cache["overall"])


def predict(model: Model, table: Table) -> Prediction:
    rows = []
    for unit in units(model):
        ms, how = entry_ms(unit, table)
        rows.append((unit, ms, how))
    f = table.fit
    per_unit = f.get("per_unit_ms", 0.0) * len(rows)
    raw = f["scale"] * sum(ms for _, ms, _ in rows)
    # a negative per-unit correction never takes more than half of what the units measured
    total = f["overhead_ms"] + max(raw + per_unit, raw / 2)
    return Prediction(total, rows, table)
