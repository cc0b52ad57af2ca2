"""Channel spaces: which channels of which layers must be pruned together (no torch).

A *space* is a set of channels that several layers share: a conv's output channels,
the BatchNorm and depthwise conv that follow it, every branch of a residual addition
(identity shortcuts tie a block's output to its input), every branch of an `add` or `mul` join
(a gate's channels are its input's), and a linear layer's inputs after `flatten` (each channel
there is H*W features). Concatenated and split channels are tied for now: a space is one run of
channels, and a concatenation is several. Walking the elaborated tree
once builds the spaces with a union-find; spaces that touch the model's input, its
output, a grouped (non-depthwise) conv or a torchvision model are not prunable.

`rewrite` then gives the elaborated tree with the kept channel counts, which
`compiler.emit` turns into a new spec, and `Usage` tells the weight copy which
tensor dimension of which layer follows which space.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from .ops import BLOCKS, PRODUCES, WEIGHTED, macs, record, tensors
from .tree import Node


@dataclass
class Usage:
    """How one leaf uses spaces: its input space, its output space, flatten factor for linears."""

    node: Node
    role: str                 # PRODUCES (conv, linear) or WEIGHTED (bn, depthwise conv): see compiler.ops
    inp: int | None = None
    out: int | None = None
    factor: int = 1           # features per input channel (linear after flatten of CxHxW)


@dataclass
class Spaces:
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    frozen: list[bool] = field(default_factory=list)
    usages: list[Usage] = field(default_factory=list)
    activations: list[int] = field(default_factory=list)  # output elements per channel, per raw space

    def new(self, size: int, frozen: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.frozen.append(frozen)
        self.activations.append(0)
        return len(self.parent) - 1

    def activations_per_channel(self, space: int) -> int:
        """Elements every layer working in this space writes per channel (a memory-traffic cost:
        pooling, normalisation and activations scale with it, not with MACs)."""
        root = self.find(space)
        return sum(a for s, a in enumerate(self.activations) if self.find(s) == root)

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.size[a] != self.size[b]:
                raise ValueError(f"cannot tie spaces of {self.size[a]} and {self.size[b]} channels")
            self.parent[b] = a
            self.frozen[a] = self.frozen[a] or self.frozen[b]
        return a

    def freeze(self, s: int) -> None:
        self.frozen[self.find(s)] = True

    def prunable(self) -> list[int]:
        roots = sorted({self.find(s) for s in range(len(self.parent))})
        return [r for r in roots if not self.frozen[r]]

    def members(self, space: int) -> list[Usage]:
        """Usages whose output (or, for bn/dwconv, whose channels) lie in `space`."""
        root = self.find(space)
        return [u for u in self.usages if u.out is not None and self.find(u.out) == root]


def analyse_channels(root: Node) -> Spaces:
    spaces = Spaces()
    shape = root.in_shape
    start = spaces.new(shape[0], frozen=True)  # the image channels

    def walk(node: Node, space: int, spatial: int) -> tuple[int, int]:
        """Returns (space of the output channels, H*W per channel for a following flatten)."""
        out_space, out_spatial = _walk(node, space, spatial)
        if not node.children:
            per_channel = 1
            for s in node.out_shape[1:]:
                per_channel *= s
            spaces.activations[out_space] += per_channel
        return out_space, out_spatial

    def _walk(node: Node, space: int, spatial: int) -> tuple[int, int]:
        op, a = node.op, node.attrs
        if op == "seq":
            for child in node.children:
                space, spatial = walk(child, space, spatial)
            return space, spatial
        if op == "residual":
            parts = {c.name: c for c in node.children}
            body, spatial_out = walk(parts["body"], space, spatial)
            short = walk(parts["shortcut"], space, spatial)[0] if "shortcut" in parts else space
            return spaces.union(body, short), spatial_out
        if op == "join":
            return _join(node, space, spatial)
        image_out = len(node.out_shape) == 3
        out_spatial = node.out_shape[1] * node.out_shape[2] if image_out else 1
        try:
            kind = record(op).role(a)
        except KeyError as err:  # a missing rule must fail, never pass channels through silently
            raise ValueError(f"{node.path or 'the model'}: {err}") from None
        if kind == PRODUCES:
            out = spaces.new(node.out_shape[0])
            factor = a["in"] // spaces.size[spaces.find(space)] if not image_out else 1
            spaces.usages.append(Usage(node, PRODUCES, space, out, factor))
            return out, out_spatial
        if kind == WEIGHTED:
            spaces.usages.append(Usage(node, WEIGHTED, space, space))
            return space, out_spatial if image_out else spatial
        if kind == BLOCKS:
            spaces.freeze(space)
            return spaces.new(node.out_shape[0], frozen=True), out_spatial
        return space, out_spatial if image_out else spatial  # PASSES

    def _join(node: Node, space: int, spatial: int) -> tuple[int, int]:
        split = node.attrs["split"]
        if split:
            spaces.freeze(space)
        outs = []
        for i, branch in enumerate(node.children):
            inp = spaces.new(split[i], frozen=True) if split else space
            outs.append(walk(branch, inp, spatial))
        out_spatial = math.prod(node.out_shape[1:]) if len(node.out_shape) == 3 else spatial
        if node.attrs["mode"] == "concat":
            for s, _ in outs:
                spaces.freeze(s)
            return spaces.new(node.out_shape[0], frozen=True), out_spatial
        joined = outs[0][0]
        for s, _ in outs[1:]:
            joined = spaces.union(joined, s)
        return joined, out_spatial

    end, _ = walk(root, start, shape[1] * shape[2] if len(shape) == 3 else 1)
    spaces.freeze(end)  # the classes
    return spaces


def rewrite(root: Node, spaces: Spaces, kept: dict[int, int]) -> Node:
    """A copy of the tree with `kept[space]` channels in every pruned space; shapes and counts redone."""
    new_root = copy.deepcopy(root)
    by_path = {u.node.path: u for u in spaces.usages}

    def count(space: int) -> int:
        r = spaces.find(space)
        return kept.get(r, spaces.size[r])

    def redo(node: Node, shape: tuple) -> tuple:
        node.in_shape = shape
        if node.op == "join":
            split = node.attrs["split"]  # split channels are tied: the sizes stay
            outs = [redo(c, (split[i], *shape[1:]) if split else shape) for i, c in enumerate(node.children)]
            if node.attrs["mode"] == "concat":
                node.out_shape = (sum(o[0] for o in outs), *outs[0][1:])
            else:
                node.out_shape = max(outs, key=math.prod)
            return node.out_shape
        if node.children or node.op == "seq":  # an empty seq is an identity branch
            if node.op == "residual":
                parts = {c.name: c for c in node.children}
                out = redo(parts["body"], shape)
                if "shortcut" in parts:
                    redo(parts["shortcut"], shape)
            else:
                out = shape
                for c in node.children:
                    out = redo(c, out)
            node.out_shape = out
            return out
        u = by_path.get(node.path)
        a = node.attrs
        rec = record(node.op)
        if u is not None:
            rec.rechannel(a, shape[0], count(u.out))
        node.out_shape = rec.reshaped(a, shape, node.out_shape)
        node.tensors = tensors(node.op, a)
        node.macs = macs(node.op, a, node.out_shape)
        return node.out_shape

    redo(new_root, root.in_shape)
    return new_root
