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


def compile_spec(path: str | Path, *, model: str | None = None, params: dict[str, str] | None = None,
                 input_shape: tuple | None = None) -> Model:
    """Parse, validate and elaborate a spec file; raises SpecError / UsageError."""
    spec, text, pending = parse_file(path)
    syntax = "yaml" if Path(path).suffix in (".yaml", ".yml") else "dsl"
    return _finish(spec, text, pending, syntax, model, params, input_shape)


def compile_source(text: str, label: str, *, syntax: str = "dsl", model: str | None = None,
                   params: dict[str, str] | None = None, input_shape: tuple | None = None) -> Model:
    """Like compile_spec, for spec text (e.g. the spec embedded in a model file)."""
    from .parse import parse_dsl, parse_yaml

    if syntax == "yaml":
        spec, pending = parse_yaml(text, label)
    else:
        spec, pending = parse_dsl(text, label), []
    return _finish(spec, text, pending, syntax, model, params, input_shape)


def _finish(spec, text, pending, syntax, model, params, input_shape) -> Model:
    sources = {spec.path: text}
    spec = validate(spec, sources, pending)
    result = elaborate(spec, model=model, params=params, input_shape=input_shape, sources=sources)
    result.source = text
    result.syntax = syntax
    return result


def build_module(model: Model, seed: int | None = 0):
    """The nn.Module of an elaborated model (imports torch)."""
    from .build import build

    return build(model, seed=seed)


__all__ = ["Analysis", "Model", "NcError", "SpecError", "UsageError", "analyse", "build_module", "compile_source", "compile_spec",
           "elaborate", "parse_file", "parse_shape", "predicted_bytes", "validate"]
