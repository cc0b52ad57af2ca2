"""`linear` -> op `linear` (nn.Linear)."""
from __future__ import annotations

from .base import PRODUCES, ArgSpec, LayerError, LayerKind, OpRecord, Tensor, boolean, fmt_shape, positive, role


def _resolve(shape, a):
    if len(shape) != 1:
        raise LayerError(f"linear expects a flat input, got {fmt_shape(shape)}",
                         hint="insert `flatten` before it (after `gap` for conv features)")
    if a.get("in") is not None and a["in"] != shape[0]:
        raise LayerError(f"linear declares in={a['in']} input features but its input has {shape[0]}", arg="in",
                         hint="drop `in=` to infer it from the previous layer")
    return "linear", {"in": shape[0], "out": a["out"], "bias": a["bias"]}, (a["out"],)


def _tensors(a: dict) -> list[Tensor]:
    return [Tensor("weight", (a["out"], a["in"]))] + ([Tensor("bias", (a["out"],))] if a["bias"] else [])


def _emit(node, arg) -> str:
    return f"linear({arg('out')}, bias={boolean(node.attrs['bias'])}, scale=false)"


_B = ArgSpec
LAYER_KINDS = [
    # fully connected layer
    LayerKind("linear", "linear", (_B("out", "int"), _B("bias", "bool", True), _B("scale", "bool", True),
                                   _B("in", "int", None)), _resolve, scalable=True,
              check=lambda a: positive(a, "out")),
]
def _rechannel(a: dict, in_features: int, out_features: int) -> None:
    a["in"], a["out"] = in_features, out_features


def _factor(a: dict, rank: int):
    return ("linear", {"out": rank, "bias": False}), ("linear", {"out": a["out"], "bias": a["bias"]})


def _onnx(g, a: dict, x: str) -> str:
    return g.node("Gemm", [x, g.weight("weight")] + ([g.weight("bias")] if g.has("bias") else []), transB=1)


OPS = [OpRecord("linear", _emit, role(PRODUCES), _tensors, lambda a, out: a["in"] * a["out"], _rechannel, fresh=True,
                factor=_factor, onnx=_onnx)]
