"""Search spaces: the candidate values a model's parameters declare (`base: int = 16 in 8..64 step 8`).

A space is a list (`in [3, 5]`) or an inclusive range (`in 8..64 step 8`; int ranges step 1 by
default). Ranges stay lazy, so a space of any size costs nothing until values are drawn:
`configurations` enumerates the cartesian product when it is small and draws seeded samples
from it otherwise. Torch-free.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

from . import ir
from .expr import LIMIT, ExprError, evaluate


class SpaceError(ValueError):
    """A space that cannot be used: the message says why; `span` where."""

    def __init__(self, message: str, span=None):
        super().__init__(message)
        self.span = span


@dataclass(frozen=True)
class Space:
    name: str
    type: str
    default: object
    values: tuple | None = None            # a list space
    start: float | int | None = None       # a range space: start + k * step, up to stop inclusive
    step: float | int | None = None
    count: int = 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int):
        if self.values is not None:
            return self.values[k]
        value = self.start + k * self.step
        return value if self.type == "float" else int(value)

    def __contains__(self, value) -> bool:
        if self.values is not None:
            return value in self.values
        k = (value - self.start) / self.step
        return 0 <= k < self.count and abs(k - round(k)) < 1e-9


def _constant(expr: ir.Expr, what: str, type_: str):
    try:
        value = evaluate(expr, {})
    except ExprError as err:
        raise SpaceError(f"{what}: {err} (space values are constants)", expr.span) from None
    if type_ == "bool":
        if not isinstance(value, bool):
            raise SpaceError(f"{what}: expected true or false, got {value!r}", expr.span)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{what}: expected a number, got {value!r}", expr.span)
    if type_ == "int":
        if isinstance(value, float) and not value.is_integer():
            raise SpaceError(f"{what}: expected an int, got {value!r}", expr.span)
        return int(value)
    return float(value)


def space_of(p: ir.ParamDecl, default) -> Space:
    """The evaluated space of a parameter whose default is `default`; raises SpaceError."""
    s = p.space
    where = f"the space of parameter `{p.name}`"
    if s.values is not None:
        values = tuple(_constant(e, where, p.type) for e in s.values)
        if not values:
            raise SpaceError(f"{where} is empty", s.span)
        if len(set(values)) != len(values):
            raise SpaceError(f"{where} lists a value twice", s.span)
        space = Space(p.name, p.type, default, values=values, count=len(values))
    else:
        if p.type == "bool":
            raise SpaceError(f"{where}: a bool parameter takes a list, e.g. `in [true, false]`", s.span)
        start, stop = _constant(s.start, where, p.type), _constant(s.stop, where, p.type)
        if s.step is None and p.type == "float":
            raise SpaceError(f"{where}: a float range needs a step, e.g. `in 0.5..1.0 step 0.25`", s.span)
        step = _constant(s.step, where, p.type) if s.step is not None else 1
        if step <= 0:
            raise SpaceError(f"{where}: the step must be above 0, got {step}", (s.step or s).span)
        if start > stop:
            raise SpaceError(f"{where}: the range {start}..{stop} is empty (its start is above its stop)", s.span)
        steps = (stop - start) / step
        if not math.isfinite(steps) or steps >= LIMIT:  # 0..1e308 step 1e-308: infinitely many
            raise SpaceError(f"{where}: the range {start}..{stop} step {step} holds more than 2^63 values",
                             (s.step or s).span)
        count = int(math.floor(steps + 1e-9)) + 1
        space = Space(p.name, p.type, default, start=start, step=step, count=count)
    if default is not None and default not in space:
        raise SpaceError(f"parameter `{p.name}`: its default {default!r} is not in its space", s.span)
    return space


def spaces(definition: ir.ModelDef, defaults: dict, fixed=()) -> list[Space]:
    """The spaces of the parameters left to search: `fixed` ones (--param, a study's `params`) take
    any value their type allows, in their space or not."""
    return [space_of(p, defaults.get(p.name)) for p in definition.params if p.space is not None
            and p.name not in fixed]


def size(spaces_: list[Space]) -> int:
    return math.prod(len(s) for s in spaces_)


def configurations(spaces_: list[Space], samples: int | None = None, seed: int = 0) -> Iterator[dict]:
    """Every combination (samples None), else `samples` distinct seeded draws (all of them when fewer)."""
    total = size(spaces_)
    if samples is None or samples >= total:
        for k in range(total):
            yield _decode(spaces_, k)
        return
    rng = random.Random(seed)
    for k in rng.sample(range(total), samples):  # range() samples without materialising the space
        yield _decode(spaces_, k)


def _decode(spaces_: list[Space], k: int) -> dict:
    out = {}
    for s in reversed(spaces_):
        k, i = divmod(k, len(s))
        out[s.name] = s[i]
    return dict(reversed(list(out.items())))
