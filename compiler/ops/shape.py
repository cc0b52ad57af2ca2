"""Layers without weights that reshape, reorder or skip: `flatten`, `dropout`, `droppath` (stochastic
depth), `shuffle` (channel shuffle), `identity`; and torchvision models."""
from __future__ import annotations

import math

from .base import BLOCKS, PASSES, ArgSpec, LayerError, LayerKind, OpRecord, boolean, fmt_shape, number, positive, role


def _flatten(shape, a):
    return "flatten", {}, (math.prod(shape),)


def _dropout_check(a):
    if not 0.0 <= a["p"] < 1.0:
        raise LayerError(f"dropout probability must be in [0, 1), got {a['p']}", arg="p")


def _dropout(shape, a):
    return "dropout", {"p": a["p"]}, shape


def _droppath(shape, a):
    return "droppath", {"p": a["p"]}, shape


def _shuffle(shape, a):
    if len(shape) != 3:
        raise LayerError(f"shuffle expects an image-shaped input CxHxW, got {fmt_shape(shape)}")
    if shape[0] % a["groups"]:
        raise LayerError(f"shuffle: {a['groups']} groups do not divide {shape[0]} channels", arg="groups")
    return "shuffle", {"groups": a["groups"]}, shape


def _identity(shape, a):
    return "identity", {}, shape


def _torchvision(node, arg) -> str:
    a = node.attrs
    args = ", ".join(f"{k}={boolean(v) if isinstance(v, bool) else number(v)}" for k, v in a["kwargs"].items())
    return f"torchvision {a['name']}({args})"


def _tv_part(node, arg) -> str:
    raise ValueError(f"{node.path}: a part of a torchvision model cannot be written as a layer")


LAYER_KINDS = [
    LayerKind("flatten", "flatten", (), _flatten),
    LayerKind("dropout", "dropout", (ArgSpec("p", "float", 0.5),), _dropout, check=_dropout_check),
    # stochastic depth: drops a sample's whole input with probability p in training (identity at
    # inference); put it at the end of a residual body
    LayerKind("droppath", "droppath", (ArgSpec("p", "float"),), _droppath, check=_dropout_check),
    LayerKind("shuffle", "shuffle", (ArgSpec("groups", "int"),), _shuffle,
              check=lambda a: positive(a, "groups")),
    LayerKind("identity", "identity", (), _identity),
]
# A torchvision model is opaque to pruning: its channels are tied (state-dict tensors come from
# compiler.torchvision_ref, which builds it on the meta device).
def _shuffle_onnx(g, a: dict, x: str) -> str:
    """torchvision's channel_shuffle: view as groups, swap the two channel axes, view back (0 keeps the batch)."""
    c, h, w = g.layer.in_shape
    n = a["groups"]
    x = g.node("Reshape", [x, g.const([0, n, c // n, h, w], "I64")])
    x = g.node("Transpose", [x], perm=[0, 2, 1, 3, 4])
    return g.node("Reshape", [x, g.const([0, c, h, w], "I64")])


def _unchanged(g, a: dict, x: str) -> str:  # identity at inference
    return x


OPS = [OpRecord("flatten", lambda node, arg: "flatten", role(PASSES),
                out_shape=lambda a, in_shape, old: (math.prod(in_shape),),
                onnx=lambda g, a, x: g.node("Flatten", [x], axis=1)),
       OpRecord("dropout", lambda node, arg: f"dropout({number(node.attrs['p'])})", role(PASSES), onnx=_unchanged),
       OpRecord("droppath", lambda node, arg: f"droppath({number(node.attrs['p'])})", role(PASSES), onnx=_unchanged),
       # it interleaves channel groups: pruning would have to keep them equal, so its channels stay tied
       OpRecord("shuffle", lambda node, arg: f"shuffle({node.attrs['groups']})", role(BLOCKS), onnx=_shuffle_onnx),
       OpRecord("identity", lambda node, arg: "identity", role(PASSES), onnx=_unchanged),
       OpRecord("torchvision", _torchvision, role(BLOCKS)),
       OpRecord("tv-part", _tv_part, role(BLOCKS))]
