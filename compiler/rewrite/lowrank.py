"""Low-rank factorization of a model's tree (no torch).

Each op record that can be factorized says what it splits into at a rank (`OpRecord.factor`): a k x k
conv becomes a k x k conv to `rank` outputs without bias and a 1x1 conv to `out`; a linear layer
becomes linear(rank, bias=false) then linear(out). The parts are resolved through their records. The
factorized layer keeps its path as a group, so its parts are `<path>.0` and `<path>.1`;
`compiler.rewrite.respec` writes the result as a spec.
"""
from __future__ import annotations

import copy

from ..ops import OPS, record
from ..tree import Node, layer_node


def _parts(node: Node, rank: int) -> tuple[Node, Node]:
    (first_layer, first_args), (second_layer, second_args) = record(node.op).factor(node.attrs, rank)
    first = layer_node("0", f"{node.path}.0", first_layer, node.in_shape, node.span, **first_args)
    second = layer_node("1", f"{node.path}.1", second_layer, first.out_shape, node.span, **second_args)
    return first, second


def factor_params(node: Node, rank: int) -> int:
    """Parameters of `node` factorized at `rank`."""
    return sum(t.numel for part in _parts(node, rank) for t in part.tensors if t.is_param)


def candidates(root: Node) -> list[Node]:
    """Leaves whose op record can factorize them (ungrouped convs with kernel > 1, linear layers)."""
    return [n for n in root.leaves()
            if n.op in OPS and OPS[n.op].factor is not None and OPS[n.op].factorizable(n.attrs)]


def factorize(root: Node, ranks: dict[str, int]) -> Node:
    """A copy of the tree with the layers at `ranks`' paths factorized at those ranks."""
    new_root = copy.deepcopy(root)

    def visit(node: Node) -> None:
        for i, child in enumerate(node.children):
            if child.path in ranks:
                node.children[i] = Node(child.name, child.path, "lowrank", "seq", child.in_shape, child.out_shape,
                                        children=list(_parts(child, ranks[child.path])), span=child.span)
            else:
                visit(child)

    visit(new_root)
    return new_root
