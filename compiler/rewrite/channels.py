"""Channel spaces: which channels of which layers must be pruned together (no torch).

A *space* is a set of channels that several layers share: a conv's output channels,
the BatchNorm and depthwise conv that follow it, every branch of a residual addition
(identity shortcuts tie a block's output to its input), every branch of an `add` or `mul` join
(a gate's channels are its input's), and a linear layer's inputs after `flatten` (each channel
there is H*W features). A tensor's channels are a list of segments, one space each: a
concatenation lists its branches' segments one after the other (DenseNet's growth, SqueezeNet's
expands stay prunable), and a `split` whose shares fall on segment boundaries hands each branch
its segments. Walking the elaborated tree
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

from ..ops import BLOCKS, PRODUCES, WEIGHTED, macs, record, tensors
from ..tree import Node


@dataclass
class Usage:
    """How one leaf uses spaces: the segments of its input and output channels (one space each, in
    channel order), and the flatten factor for linears."""

    node: Node
    role: str                 # PRODUCES (conv, linear) or WEIGHTED (bn, depthwise conv): see compiler.ops
    ins: list[int]
    outs: list[int]
    factor: int = 1           # features per input channel (linear after flatten of CxHxW)

    @property
    def out(self) -> int:
        """The output space of a leaf whose output is one segment (every PRODUCES)."""
        if len(self.outs) != 1:
            raise ValueError(f"{self.node.path}: its output spans {len(self.outs)} segments")
        return self.outs[0]


@dataclass
class Spaces:
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    frozen: list[bool] = field(default_factory=list)
    usages: list[Usage] = field(default_factory=list)
    splits: dict[str, list[list[int]]] = field(default_factory=dict)  # join path -> each branch's segments
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

    def per_channel(self, costs: list[tuple[tuple[str, ...], float]]) -> dict[int, float]:
        """Each prunable space's share of costs given per group of layers (a latency unit's paths and its
        time): a group's cost spread evenly over the channels of every space its layers read or write,
        so one channel less of a space saves about that much of each group touching it."""
        by_path = {u.node.path: u for u in self.usages}
        out: dict[int, float] = {}
        for paths, cost in costs:
            touched = {self.find(x) for p in paths if p in by_path for x in (*by_path[p].ins, *by_path[p].outs)}
            for root in touched:
                out[root] = out.get(root, 0.0) + cost / self.size[root]
        return out

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
        return [u for u in self.usages if self.offsets(u.outs, space)]

    def offsets(self, segments: list[int], space: int) -> list[int]:
        """Where `space`'s channels start in a tensor made of `segments` (once per occurrence)."""
        root, at, found = self.find(space), 0, []
        for s in segments:
            if self.find(s) == root:
                found.append(at)
            at += self.size[self.find(s)]
        return found

    def channels(self, segments: list[int]) -> int:
        return sum(self.size[self.find(s)] for s in segments)


def analyse_channels(root: Node) -> Spaces:
    spaces = Spaces()
    shape = root.in_shape
    start = [spaces.new(shape[0], frozen=True)]  # the image channels

    def walk(node: Node, segs: list[int], spatial: int) -> tuple[list[int], int]:
        """Returns (segments of the output channels, H*W per channel for a following flatten)."""
        out_segs, out_spatial = _walk(node, segs, spatial)
        if not node.children:
            per_channel = math.prod(node.out_shape[1:])
            for s in out_segs:
                spaces.activations[s] += per_channel
        return out_segs, out_spatial

    def _walk(node: Node, segs: list[int], spatial: int) -> tuple[list[int], int]:
        op, a = node.op, node.attrs
        if op == "seq":
            for child in node.children:
                segs, spatial = walk(child, segs, spatial)
            return segs, spatial
        if op == "residual":
            parts = {c.name: c for c in node.children}
            body, spatial_out = walk(parts["body"], segs, spatial)
            short = walk(parts["shortcut"], segs, spatial)[0] if "shortcut" in parts else segs
            return tie([body, short], node.out_shape[0]), spatial_out
        if op == "join":
            return join(node, segs, spatial)
        image_out = len(node.out_shape) == 3
        out_spatial = node.out_shape[1] * node.out_shape[2] if image_out else 1
        try:
            kind = record(op).role(a)
        except KeyError as err:  # a missing rule must fail, never pass channels through silently
            raise ValueError(f"{node.path or 'the model'}: {err}") from None
        if kind == PRODUCES:
            out = spaces.new(node.out_shape[0])
            factor = a["in"] // spaces.channels(segs) if not image_out else 1
            spaces.usages.append(Usage(node, PRODUCES, segs, [out], factor))
            return [out], out_spatial
        if kind == WEIGHTED:
            spaces.usages.append(Usage(node, WEIGHTED, segs, segs))
            return segs, out_spatial if image_out else spatial
        if kind == BLOCKS:
            return frozen(segs, node.out_shape[0]), out_spatial
        return segs, out_spatial if image_out else spatial  # PASSES

    def frozen(segs: list[int], channels: int) -> list[int]:
        for s in segs:
            spaces.freeze(s)
        return [spaces.new(channels, frozen=True)]

    def tie(branches: list[list[int]], channels: int) -> list[int]:
        """Element-wise joins: segment by segment when the branches are cut alike, else tied whole."""
        first = branches[0]
        sizes = [[spaces.size[spaces.find(s)] for s in b] for b in branches]
        if any(z != sizes[0] for z in sizes):
            return frozen([s for b in branches for s in b], channels)
        for b in branches[1:]:
            for x, y in zip(first, b):
                spaces.union(x, y)
        return first

    def join(node: Node, segs: list[int], spatial: int) -> tuple[list[int], int]:
        split = node.attrs["split"]
        inputs = [segs] * len(node.children)
        if split:
            inputs = cut(segs, split)
            if inputs is None:  # a share that cuts a segment: those channels cannot be pruned
                for s in segs:
                    spaces.freeze(s)
                inputs = [[spaces.new(n, frozen=True)] for n in split]
            else:
                spaces.splits[node.path] = inputs
        outs = [walk(branch, inp, spatial)[0] for branch, inp in zip(node.children, inputs)]
        out_spatial = math.prod(node.out_shape[1:]) if len(node.out_shape) == 3 else spatial
        if node.attrs["mode"] == "concat":
            return [s for o in outs for s in o], out_spatial
        return tie(outs, node.out_shape[0]), out_spatial

    def cut(segs: list[int], shares: list[int]) -> list[list[int]] | None:
        pieces, current, filled, i = [], [], 0, 0
        for s in segs:
            if i == len(shares):
                return None
            current.append(s)
            filled += spaces.size[spaces.find(s)]
            if filled == shares[i]:
                pieces.append(current)
                current, filled, i = [], 0, i + 1
            elif filled > shares[i]:
                return None
        return pieces if len(pieces) == len(shares) else None

    end, _ = walk(root, start, shape[1] * shape[2] if len(shape) == 3 else 1)
    for s in end:  # the classes
        spaces.freeze(s)
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
            if node.path in spaces.splits:  # each branch keeps its segments' kept channels
                node.attrs["split"] = [sum(count(s) for s in segs) for segs in spaces.splits[node.path]]
            split = node.attrs["split"]
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
            rec.rechannel(a, shape[0], sum(count(s) for s in u.outs))
        node.out_shape = rec.reshaped(a, shape, node.out_shape)
        node.tensors = tensors(node.op, a)
        node.macs = macs(node.op, a, node.out_shape)
        return node.out_shape

    redo(new_root, root.in_shape)
    return new_root
