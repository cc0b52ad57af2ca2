"""Model parameters: their typed values from defaults and overrides, and the command line's
`--param NAME=VALUE` strings parsed by the declared types (the one place strings become values)."""
from __future__ import annotations

import math

from . import ir
from .errors import Diagnostics, did_you_mean
from .expr import LIMIT, ExprError, coerce, evaluate

_EXAMPLE = {"int": "10", "float": "0.5", "bool": "true"}


def _typed(value, type_: str):
    """`value` as a parameter of type `type_` (expr.coerce's rules), finite and below 2^63, or ValueError."""
    try:
        value = coerce(value, type_)
    except TypeError:
        raise ValueError(value) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= LIMIT:
        raise ValueError(value)
    return value


def resolve_params(model: ir.ModelDef, overrides: dict[str, object], diags: Diagnostics) -> dict:
    """Parameter values: defaults, then typed overrides (int, float, bool)."""
    declared = {p.name: p for p in model.params}
    values: dict[str, object] = {}
    for name in overrides:
        if name not in declared:
            diags.error(f"model `{model.name}` has no parameter `{name}` (from --param)", model.span,
                        expected=", ".join(declared) or "no parameters", hint=did_you_mean(name, declared))
    for p in model.params:
        if p.name in overrides:
            given = overrides[p.name]
            try:
                values[p.name] = _typed(given, p.type)
            except ValueError:
                diags.error(f"parameter `{p.name}` of model `{model.name}` expects {p.type}, got `{given}` "
                            f"(from --param)", p.span, hint=f"e.g. --param {p.name}={_EXAMPLE[p.type]}")
            continue
        if p.default is None:
            diags.error(f"parameter `{p.name}` has no default", p.span, hint=f"pass --param {p.name}=...")
            continue
        try:
            value = evaluate(p.default, {})
        except ExprError as err:
            diags.error(str(err), p.default.span or p.span)
            continue
        try:
            values[p.name] = coerce(value, p.type)
        except TypeError as err:
            diags.error(f"default of parameter `{p.name}` {err}", p.default.span or p.span)
    return values


def parse_param_strings(model: ir.ModelDef, strings: dict[str, str]) -> dict[str, object]:
    """`--param NAME=VALUE` strings -> typed values by the declared types (the command line's job).
    Unknown names and unparsable values are passed on as they are, for resolve_params to report."""
    declared = {p.name: p.type for p in model.params}
    out: dict[str, object] = {}
    for name, raw in strings.items():
        type_ = declared.get(name)
        try:
            out[name] = parse_override(raw, type_) if type_ else raw
        except ValueError:
            out[name] = raw
    return out


def parse_override(raw: str, type_: str):
    if type_ == "int":
        return int(raw)
    if type_ == "float":
        return float(raw)
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ValueError(raw)
