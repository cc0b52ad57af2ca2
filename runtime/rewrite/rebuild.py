"""The rewrite seam on the torch side: a rewritten tree becomes a spec (compiler.rewrite.respec),
a module built from it, and the carried-over weights loaded into that module exactly."""
from __future__ import annotations

import torch

import compiler
from compiler.rewrite.respec import respec
from compiler.tree import Model, Node

from ..weights import load_into


def rebuild(model: Model, root: Node, state: dict[str, torch.Tensor], *, comment: str, label: str,
            training: bool = False) -> tuple[Model, torch.nn.Module, str]:
    """(new model, its module holding `state`, its spec text) for `model` rewritten to `root`."""
    text, new_model = respec(model, root, comment=comment, label=label)
    module = compiler.build_module(new_model)
    load_into(module, state, f"{label} weights")
    return new_model, module.train(training), text
