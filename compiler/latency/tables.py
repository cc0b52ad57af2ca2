"""Latency tables: one JSON file per target, measured by `nccompile profile` on one machine; refused
when read on another machine, with another library version, or for another target."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NcError

# target -> the library whose version counts. ort-fp32: ONNX Runtime on the float graph (and on the `weights`
# file, whose decoding ORT folds at load); ort-int8: on the `int8` QDQ file; torch-fp32: PyTorch eager
TARGETS = {"ort-fp32": "onnxruntime", "ort-int8": "onnxruntime", "torch-fp32": "torch"}
FIRST_CONV_FLOAT = {"ort-int8"}  # the int8 file keeps its first conv in float (runtime/deploy/qdq.py)
ALIASES = {"ort-weights": "ort-fp32"}  # the `weights` export runs on the float graph's kernels after folding
# 2: ORT units are kernel times; 3: the int8 file pools in float after its float conv and keeps unfolded
# BatchNorms in float, the overhead goes through the empty models measured
TABLE_FORMAT, TABLE_VERSION = "nccompile-latency", 3
# how a target is timed beyond its library, recorded in a table's `settings` (runtime/profile/measure.py):
# PyTorch with glibc's malloc keeping freed memory, without which a large tensor's pages fault in again on
# every call (the student's first conv at 256 px: 3.6-8.7 ms so, 1.0-1.9 ms with freed memory kept)
SETTINGS = {"torch-fp32": ("allocator",)}
# a unit of up to this many input elements works in the cache alone as inside a model: the fitted per-unit
# terms, what a larger unit alone misses of a model's cache, pass it by (a table's fit says where each
# applies), and on ONNX Runtime the profiler's whole microseconds are most of its time, so the clock times it
# (int8's float head aside)
SMALL_UNIT_INPUTS = 4096
# on ONNX Runtime a unit of up to this many input elements enters a prediction at its measured time, the
# runtime's step added: the fitted scales and per-unit terms (-0.4 to -0.8 us a unit in-model), what a larger
# unit alone or under the profiler misses of a model, come from models of larger units, and took a third off
# the int8 random specs' tiny units (0.5-2 us each); on four of five kept int8 tables their median error went
# from 13-21% to 6-10%, on the fifth from 13% to 16% (BENCHMARKS.md). Where the clock timed such a unit
# alone and ORT's profiler inside models too, it enters at the mean of the two: the profiler's whole
# microseconds and a unit alone's edges (int8's conversions) err either way, by 0.5-1 us (a linear on 112
# values: 1.0 us alone, 2.2 in models); the random specs' median error went from 6-19% to 5-18% on four
# int8 tables, and on four fp32 ones as far as from 6.1% to 3.7% (BENCHMARKS.md)
RAW_UNIT_INPUTS = 512
# where the scale for units timed alone may start (input elements; a fit picks the one that fits its whole
# models best, `alone_scale_above`): on PyTorch a large unit alone runs 0.7-0.85x slower than inside a
# model (its input not in the cache; max pooling's branches on smoother data), a unit of a few thousand
# values as it does inside
SCALE_ABOVE_CANDIDATES = (0, 4_096, 16_384, 65_536, 262_144, 1_048_576)
# where a model's weights start to come from memory on each run (the elements its units move, summed; a fit
# picks the one that explains the in-model times of its models' weight-bound units best, `cold_above`): a
# unit alone runs with its weights in the cache, inside a large model they were evicted since the last run.
# On the bench's VM (1 MiB L2, 32 MiB L3) the zoo's 1x1 convs at 7x7 and its classifiers took 80-160 ps more
# per weight inside the models than alone on ort-fp32, the search space's models at 64 px (up to 2.1M
# elements moved) none; on ort-int8 (a quarter of the bytes) only the three largest models paid
COLD_ABOVE_CANDIDATES = (1_048_576, 2_097_152, 4_194_304, 8_388_608, 16_777_216, 33_554_432, 67_108_864)


class LatencyError(NcError):
    """No usable latency table: missing, for another target or machine, or lacking a unit's structure."""


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
    entries: dict = field(default_factory=dict)  # key -> {"ms", "macs", "moved", "structure", "ctx"}
    settings: dict = field(default_factory=dict)  # how the target was timed (SETTINGS)
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # predict's indexes of the entries

    def touch(self) -> None:
        """Forget what prediction derived from the entries: call after adding or changing some."""
        self.derived.clear()

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "target": self.target, "threads": self.threads,
                "batch": self.batch, "machine": self.machine, "libraries": self.libraries, "fit": self.fit,
                "settings": self.settings, "entries": self.entries}

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
                  raw.get("fit", {"overhead_ms": 0.0, "scale": 1.0}), raw.get("entries", {}),
                  raw.get("settings", {}))
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
        missing = [name for name in SETTINGS.get(target, ()) if name not in table.settings]
        if missing:
            raise LatencyError(f"{where} was measured before nccompile recorded its {', '.join(missing)} (it "
                               f"changes the times: 4x on a large conv){hint}")
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
