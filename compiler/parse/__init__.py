"""Front ends: DSL and YAML text -> IR (`compiler.ir.SpecFile`)."""
from __future__ import annotations

from pathlib import Path

from ..limits import read_text
from .dsl import parse_dsl
from .yaml_front import parse_yaml


def parse_file(path: str | Path) -> tuple["SpecFile", str, list]:  # noqa: F821
    """Read and parse a spec file by its extension.

    Returns (IR, source text, diagnostics not yet raised): problems a front end can
    step over are handed to the validator so the user sees them all at once.
    """
    path = Path(path)
    text = read_text(path, "spec file", "spec_bytes")
    if path.suffix in (".yaml", ".yml"):
        spec, pending = parse_yaml(text, str(path))
        return spec, text, pending
    return parse_dsl(text, str(path)), text, []


__all__ = ["parse_file", "parse_dsl", "parse_yaml"]
