"""`nccompile search`: every configuration of a spec's search space analysed without torch.

The spec is parsed and validated once; each configuration is only elaborated and analysed
(parameters, MACs, the file bytes of the formats asked for and of its budgets). Those that
break a budget, or do not elaborate (channels that do not divide, say), are counted and
dropped; the rest form the candidates, whose Pareto front trades a capacity objective
(parameters or MACs, the more the better) against file bytes (the fewer the better), or, with the
objective `latency`, parameters against the latency predicted from this machine's table.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .analysis import budgets, predicted_latency
from .elaborate import elaborate, select_model
from .errors import NcError, UsageError
from .fileformat import SPEC, model_format, predicted_bytes
from .params import parse_param_strings
from .parse import parse_file
from .space import configurations, size, spaces
from .tree import Model
from .validate import validate

OBJECTIVES = ("params", "macs", "latency")


@dataclass
class Candidate:
    params: dict                    # the searched parameters' values
    params_count: int
    macs: int
    bytes: dict[str, int]           # format -> exact file bytes
    ok: bool                        # every budget holds
    model: Model | None = field(default=None, repr=False)
    latency_ms: float | None = None  # predicted (a latency budget's target, or the search's)

    def as_json(self) -> dict:
        out = {"params": self.params, "params_count": self.params_count, "macs": self.macs, "bytes": self.bytes,
               "ok": self.ok}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        return out


@dataclass
class SearchResult:
    model: str
    space_size: int
    evaluated: int
    candidates: list[Candidate]     # configurations that meet every budget
    rejected: int                   # broke a budget
    invalid: int                    # did not elaborate
    invalid_example: str = ""
    seconds: float = 0.0


def search(path: str | Path, *, model: str | None = None, fixed: dict[str, str] | None = None,
           input_shape: tuple | None = None, samples: int | None = None, seed: int = 0,
           formats: tuple[str, ...] = ("int8",), max_exhaustive: int = 100_000,
           latency_target: str | None = None) -> SearchResult:
    """Analyse the configurations of the spec's space (all of them, or `samples` seeded draws);
    `latency_target`: also predict each one's latency on that target (compiler.latency)."""
    t0 = time.perf_counter()
    spec, text, pending = parse_file(path)
    sources = {spec.path: text}
    spec = validate(spec, sources, pending)
    definition = select_model(spec, model)
    base = parse_param_strings(definition, fixed or {})
    declared = {p.name: p for p in definition.params}
    defaults = {}
    plain = elaborate(spec, model=model, params=base, input_shape=input_shape, sources=sources)
    defaults.update(plain.params)
    space_list = spaces(definition, defaults, fixed=base)
    if not space_list:
        raise UsageError(f"model `{definition.name}` declares no search space (e.g. `base: int = 16 in 8..64 step 8`)"
                         + (" beyond the parameters fixed with --param" if base else ""))
    total = size(space_list)
    if samples is None and total > max_exhaustive:
        raise UsageError(f"the space of `{definition.name}` has {total:,} configurations, more than "
                         f"{max_exhaustive:,} to enumerate\n  hint: draw some with --samples N")
    if samples is not None and min(samples, total) > max_exhaustive:  # about 1,200 a second: past this, hours
        raise UsageError(f"--samples {samples:,}: more than {max_exhaustive:,} configurations to analyse\n"
                         f"  hint: draw at most {max_exhaustive:,}")
    syntax = "yaml" if Path(path).suffix in (".yaml", ".yml") else "dsl"
    result = SearchResult(definition.name, total, 0, [], 0, 0)
    for config in configurations(space_list, samples, seed):
        result.evaluated += 1
        try:
            m = elaborate(spec, model=model, params={**base, **config}, input_shape=input_shape, sources=sources)
        except NcError as err:
            result.invalid += 1
            result.invalid_example = result.invalid_example or f"{config}: {str(err).splitlines()[0]}"
            continue
        m.source, m.syntax = text, syntax
        sizes, ok, ms = _measure(m, formats, latency_target)
        if not ok:
            result.rejected += 1
            continue
        result.candidates.append(Candidate({k: config[k] for k in config if k in declared}, m.root.params,
                                           m.root.total_macs, sizes, ok, m, ms))
    result.seconds = time.perf_counter() - t0
    return result


def _measure(m: Model, formats, latency_target: str | None) -> tuple[dict[str, int], bool, float | None]:
    """The file bytes of `formats` and of the budgets' formats, whether every budget holds, and the
    predicted latency on `latency_target`."""
    checks = budgets(m, top=False)
    sizes = {b.format: b.value for b in checks if b.metric == "bytes"}
    for fmt in formats:
        if fmt not in sizes and not (fmt == SPEC and m.definition.precision is None):
            sizes[fmt] = predicted_bytes(m, model_format(m, fmt))
    ms = None
    if latency_target is not None:
        from .latency import canonical_target

        ms = next((b.value for b in checks if b.metric == "latency"
                   and canonical_target(b.format) == canonical_target(latency_target)), None)
        ms = predicted_latency(m, latency_target).ms if ms is None else ms
    return sizes, all(b.ok for b in checks), ms


def pareto(candidates: list[Candidate], objective: str = "params", bytes_format: str = "int8") -> list[Candidate]:
    """The candidates no other beats on both counts: at least as much `objective` for no more bytes; for
    `latency`, at least as many parameters for no more predicted latency."""
    if objective == "latency":
        ordered = sorted(candidates, key=lambda c: (c.latency_ms, -c.params_count))
        key = "params_count"
    else:
        key = "params_count" if objective == "params" else "macs"
        ordered = sorted(candidates, key=lambda c: (c.bytes[bytes_format], -getattr(c, key)))
    front, best = [], -1
    for c in ordered:
        value = getattr(c, key)
        if value > best:
            front.append(c)
            best = value
    return front
