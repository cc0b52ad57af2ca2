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
def _onnx(g, a: dict, x: str) -> str:
    fn = a["fn"]
    if fn == "relu6":
        return g.node("Clip", [x, g.const(0.0, shape=()), g.const(6.0, shape=())])
    if fn == "gelu":  # exact (erf) GELU, as nn.GELU; ONNX's own Gelu needs opset 20
        half = g.node("Mul", [x, g.const(0.5, shape=())])
        erf = g.node("Erf", [g.node("Mul", [x, g.const(0.7071067811865476, shape=())])])
        return g.node("Mul", [half, g.node("Add", [erf, g.const(1.0, shape=())])])
    if fn == "silu":
        return g.node("Mul", [x, g.node("Sigmoid", [x])])
    if fn == "hardsigmoid":
        return g.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if fn == "leaky_relu":
        return g.node("LeakyRelu", [x], alpha=a["slope"])
    return g.node({"relu": "Relu", "hardswish": "HardSwish", "sigmoid": "Sigmoid", "tanh": "Tanh"}[fn], [x])


OPS = [OpRecord("act", _emit, role(PASSES), onnx=_onnx)]
