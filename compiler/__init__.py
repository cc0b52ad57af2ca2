"""nccompile's compiler: spec text -> IR -> analysis (no torch) / nn.Module (torch).

Pipeline: `parse` (DSL or YAML) -> `validate` -> `elaborate` (concrete layer tree)
-> `analysis` (counts, bytes, budgets) or `build` (nn.Module). Importing this
package does not import torch; only `build_module` and torchvision references do.
"""
from __future__ import annotations

from pathlib import Path

from .analysis import Analysis, analyse, predicted_bytes
from .elaborate import Model, elaborate, parse_shape
from .errors import NcError, SpecError, UsageError
from .parse import parse_file
from .validate import validate

Params = dict[str, object]  # model parameter values: int, float or bool, as declared


def compile_spec(path: str | Path, *, model: str | None = None, params: Params | None = None,
                 input_shape: tuple | None = None, param_strings: dict[str, str] | None = None,
                 if_declared: Params | None = None) -> Model:
    """Parse, validate and elaborate a spec file; raises SpecError / UsageError.

    `params` are typed values. `param_strings` are the command line's `--param` strings, parsed by
    the declared types (the one place strings become values). `if_declared` values apply to the
    parameters the spec declares and nobody set (the data's class count, for one)."""
    spec, text, pending = parse_file(path)
    syntax = "yaml" if Path(path).suffix in (".yaml", ".yml") else "dsl"
    return _finish(spec, text, pending, syntax, model, params, input_shape, param_strings, if_declared)


def compile_source(text: str, label: str, *, syntax: str = "dsl", model: str | None = None,
                   params: Params | None = None, input_shape: tuple | None = None) -> Model:
    """Like compile_spec, for spec text (e.g. the spec embedded in a model file)."""
    from .parse import parse_dsl, parse_yaml

    if syntax == "yaml":
        spec, pending = parse_yaml(text, label)
    else:
        spec, pending = parse_dsl(text, label), []
    return _finish(spec, text, pending, syntax, model, params, input_shape)


def _finish(spec, text, pending, syntax, model, params, input_shape, param_strings=None, if_declared=None) -> Model:
    sources = {spec.path: text}
    spec = validate(spec, sources, pending)
    if param_strings or if_declared:
        from .elaborate import select_model
        from .params import parse_param_strings

        definition = select_model(spec, model)
        params = {**(params or {}), **parse_param_strings(definition, param_strings or {})}
        declared = {p.name for p in definition.params}
        params.update({k: v for k, v in (if_declared or {}).items() if k in declared and k not in params})
    result = elaborate(spec, model=model, params=params, input_shape=input_shape, sources=sources)
    result.source = text
    result.syntax = syntax
    return result


def build_module(model: Model, seed: int | None = 0):
    """The nn.Module of an elaborated model (imports torch)."""
    from .build import build

    return build(model, seed=seed)


__all__ = ["Analysis", "Model", "NcError", "SpecError", "UsageError", "analyse", "build_module", "compile_source",
           "compile_spec",
           "elaborate", "parse_file", "parse_shape", "predicted_bytes", "validate"]
