"""Low-rank factorization of a model's tree (no torch).

A k x k conv with `out` outputs becomes a k x k conv with `rank` outputs (no bias)
followed by a 1x1 conv to `out` (with the original bias); a linear layer becomes
linear(rank, bias=false) followed by linear(out). The factorized layer keeps its
path as a group, so its parts are `<path>.0` and `<path>.1`; `compiler.emit` writes
the result as a spec.
"""
from __future__ import annotations

import copy

from .ops import macs, tensors
from .tree import Node


def factor_params(node: Node, rank: int) -> int:
    a = node.attrs
    if node.op == "conv":
        return rank * a["in"] * a["kernel"] ** 2 + a["out"] * rank + (a["out"] if a["bias"] else 0)
    return rank * a["in"] + a["out"] * rank + (a["out"] if a["bias"] else 0)


def candidates(root: Node) -> list[Node]:
    """Layers that can be factorized: ungrouped convs with kernel > 1, and linear layers."""
    return [n for n in root.leaves()
            if (n.op == "conv" and n.attrs["groups"] == 1 and n.attrs["kernel"] > 1) or n.op == "linear"]


def factorize(root: Node, ranks: dict[str, int]) -> Node:
    """A copy of the tree with the layers at `ranks`' paths factorized at those ranks."""
    new_root = copy.deepcopy(root)

    def visit(node: Node) -> None:
        for i, child in enumerate(node.children):
            if child.path in ranks:
                node.children[i] = _split(child, ranks[child.path])
            else:
                visit(child)

    visit(new_root)
    return new_root


def _split(node: Node, rank: int) -> Node:
    a = node.attrs
    if node.op == "conv":
        mid = (rank, *node.out_shape[1:])
        first_attrs = {**a, "out": rank, "bias": False}
        second_attrs = {"in": rank, "out": a["out"], "kernel": 1, "stride": 1, "padding": 0, "groups": 1,
                        "dilation": 1, "bias": a["bias"]}
        layers = ("conv", "pwconv")
    else:
        mid = (rank,)
        first_attrs = {"in": a["in"], "out": rank, "bias": False}
        second_attrs = {"in": rank, "out": a["out"], "bias": a["bias"]}
        layers = ("linear", "linear")
    first = Node("0", f"{node.path}.0", layers[0], node.op, node.in_shape, mid, attrs=first_attrs, span=node.span,
                 tensors=tensors(node.op, first_attrs), macs=macs(node.op, first_attrs, mid))
    second = Node("1", f"{node.path}.1", layers[1], node.op, mid, node.out_shape, attrs=second_attrs, span=node.span,
                  tensors=tensors(node.op, second_attrs), macs=macs(node.op, second_attrs, node.out_shape))
    return Node(node.name, node.path, "lowrank", "seq", node.in_shape, node.out_shape, children=[first, second],
                span=node.span)
