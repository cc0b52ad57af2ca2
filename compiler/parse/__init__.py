"""Front ends: DSL and YAML text -> IR (`compiler.ir.SpecFile`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .dsl import parse_dsl
from .yaml_front import parse_yaml


def parse_file(path: str | Path) -> tuple["SpecFile", str]:  # noqa: F821
    """Read and parse a spec file by its extension; returns (IR, source text)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read spec file ({err})") from None
    if path.suffix in (".yaml", ".yml"):
        return parse_yaml(text, str(path)), text
    return parse_dsl(text, str(path)), text


__all__ = ["parse_file", "parse_dsl", "parse_yaml"]
