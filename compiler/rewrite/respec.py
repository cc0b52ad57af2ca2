"""The one way a rewritten model becomes a spec again: emit it as DSL and compile that text.

Pruning, low-rank factorization and per-layer precision all end here, so the model they hand on
has a spec that parses, analyses and builds like any other, with the same parameters and input.
"""
from __future__ import annotations

from dataclasses import replace

from .. import compile_source
from ..emit import emit
from ..ir import ModelDef
from ..tree import Model, Node


def respec(model: Model, root: Node | None = None, *, definition: ModelDef | None = None, comment: str = "",
           label: str) -> tuple[str, Model]:
    """DSL text of `model` with its tree replaced by `root` (or its definition by `definition`), and
    that text compiled under the file label `label`."""
    source = model if definition is None else replace(model, definition=definition)
    text = emit(source, root, comment=comment)
    return text, compile_source(text, label, params=dict(model.params), input_shape=tuple(model.input_shape))
