"""Activations -> op `act`. A new one is one name here plus its nn class in compiler/build.py."""
from __future__ import annotations

from .base import PASSES, ArgSpec, LayerKind, OpRecord, number, role

NAMES = ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh")


def _resolve(name: str):
    def resolve(shape, a):
        attrs = {"fn": name}
        if name == "leaky_relu":
            attrs["slope"] = a["slope"]
        return "act", attrs, shape

    return resolve


def _emit(node, arg) -> str:
    a = node.attrs
    return f"leaky_relu({number(a['slope'])})" if a["fn"] == "leaky_relu" else a["fn"]


LAYER_KINDS = [LayerKind(n, "act", (), _resolve(n)) for n in NAMES] + [
    LayerKind("leaky_relu", "act", (ArgSpec("slope", "float", 0.01),), _resolve("leaky_relu")),
]
OPS = [OpRecord("act", _emit, role(PASSES))]
