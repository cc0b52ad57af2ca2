"""The weight format a step names, resolved against its model: shared by `quantize` and the
quantization-aware settings of `train` / `distill`, so both see the same tensors the same way."""
from __future__ import annotations

from fnmatch import fnmatchcase

from compiler.errors import NcError
from compiler.fileformat import FORMAT_HELP, SPEC, WeightFormat, is_format, parse_format, spec_format, weight_tensors


def resolve_format(where: str, name: str, model=None, *, fallback: str | None = None, formats: dict | None = None,
                   **options) -> WeightFormat:
    """`name` (a format, or `spec`: the spec's precision section, else `fallback`) plus the
    `formats` pattern overrides, for `model` (None: checked without a model)."""
    formats = formats or {}
    for pattern, fmt in formats.items():
        if not is_format(fmt):
            raise NcError(f"{where}: formats.{pattern}: unknown format `{fmt}` (known: {FORMAT_HELP})")
    if fallback is not None and not is_format(fallback):
        raise NcError(f"{where}: fallback: unknown format `{fallback}` (known: {FORMAT_HELP})")
    options = dict(options, overrides=tuple(formats.items()))
    if name == SPEC:
        if model is None:
            return parse_format(fallback or "fp32", **options)
        if model.definition.precision is not None:
            return spec_format(model, **options)
        if fallback is None:
            raise NcError(f"{where}: format `spec` needs a `precision` section in the spec of `{model.name}`\n"
                          f"  hint: add one (e.g. `precision int4 {{ \"fc\": int8 }}`), name a format, "
                          f"or give a `fallback` format")
        return parse_format(fallback, **options)
    if not is_format(name):
        raise NcError(f"{where}: unknown format `{name}` (known: {FORMAT_HELP})")
    return parse_format(name, **options)


def unmatched_patterns(where: str, formats: dict, model, fold_bn: bool = False) -> list[str]:
    """A problem for each `formats` pattern that matches no tensor the file stores."""
    if not formats:
        return []
    names = [n for n, _ in weight_tensors(model, fold_bn)]
    unused = [p for p in formats if not any(fnmatchcase(n, p) for n in names)]
    if not unused:
        return []
    return [f"{where}: formats pattern(s) {', '.join(map(repr, unused))} match no tensor of `{model.name}` "
            f"(its tensors are named like {names[0]!r}, {names[-1]!r})"]
