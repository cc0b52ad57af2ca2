"""A model as latency units: what a runtime runs as one piece. A conv or linear with the BatchNorm and
activation after it (ONNX Runtime fuses them into one kernel), a pool, a residual's add, a join, a
torchvision model whole. A unit's key is its layers as DSL at its input shape, so the profiler compiles
each unit alone as a one-unit spec."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..ops import fmt_shape
from ..tree import Model, Node

FUSED_AFTER = {"conv": ("bn", "act"), "linear": ("act",)}  # what a compute layer's unit takes in, in order
FREE = {"identity", "dropout", "droppath"}  # no work at inference: joins the unit before it


@dataclass(frozen=True)
class Unit:
    text: str           # the unit's layers as DSL: "conv(32, kernel=3, stride=2) bn act(relu6)"
    in_shape: tuple     # one sample's input
    macs: int
    moved: int          # elements read and written: input, output and weights
    paths: tuple = ()   # the model's layers it covers
    variant: str = ""   # how the target runs it, where not as its other units: "float" (int8's first conv)
    weights: int = 0    # elements of its layers' own tensors (a residual's add has none of its branch's)

    @property
    def key(self) -> str:
        return f"{self.text} @ {fmt_shape(self.in_shape)}" + (f" [{self.variant}]" if self.variant else "")

    @property
    def structure(self) -> str:
        return re.sub(r"\d+(\.\d+)?", "#", self.text) + (f" [{self.variant}]" if self.variant else "")

    def spec(self, after: str = "") -> str:
        """A one-unit spec the profiler compiles and times (a flat input enters as Cx1x1, then `flatten`),
        with the layers `after` following the unit's."""
        tail = f" {after}" if after else ""
        if len(self.in_shape) == 1:
            return f"model unit {{\n    input {self.in_shape[0]}x1x1\n    flatten {self.text}{tail}\n}}\n"
        return f"model unit {{\n    input {fmt_shape(self.in_shape)}\n    {self.text}{tail}\n}}\n"


def baseline_spec(in_shape: tuple) -> str:
    """The one-unit spec of no work at `in_shape`: its time (session call, feeding the input) is taken off
    each unit's, since a whole model pays it once."""
    return Unit("identity", tuple(in_shape), 0, 0).spec()


def _leaf_text(node: Node) -> str:
    from ..emit import leaf  # emit imports the ops registry: only when units are cut

    return leaf(node)


def _unit(nodes: list[Node], text: str | None = None, in_shape: tuple | None = None) -> Unit:
    in_shape = in_shape or nodes[0].in_shape
    weights = sum(t.numel for n in nodes for t in n.tensors)
    return Unit(text or " ".join(_leaf_text(n) for n in nodes), tuple(in_shape), sum(n.macs for n in nodes),
                math.prod(in_shape) + math.prod(nodes[-1].out_shape) + weights, tuple(n.path for n in nodes),
                weights=weights)


def units(model: Model) -> list[Unit]:
    """The model's units in execution order."""
    out: list[Unit] = []
    _walk(model.root, out)
    return out


CONVS = ("conv(", "dwconv(", "pwconv(")
POOLS = ("maxpool(", "avgpool(")


def target_units(model: Model, first_conv_float: bool) -> list[Unit]:
    """The model's units as a target runs them. With `first_conv_float` (int8 files keep their first conv
    in float), the first conv unit and the pools right after it are one "float" unit: ORT runs a pool
    between the float conv and the first int8 one as a uint8 pool in plain layout, many times its time
    alone, and the profiler measures them so (measure.unit_spec)."""
    out = units(model)
    if not first_conv_float:
        return out
    first = next((i for i, u in enumerate(out) if u.text.startswith(CONVS)), None)
    if first is None:
        return out
    end = first + 1
    while end < len(out) and out[end].text.startswith(POOLS):
        end += 1
    group = out[first:end]
    out[first:end] = [Unit(" ".join(u.text for u in group), group[0].in_shape, sum(u.macs for u in group),
                           sum(u.moved for u in group), tuple(p for u in group for p in u.paths), "float",
                           sum(u.weights for u in group))]
    return out


def _walk(node: Node, out: list[Unit]) -> None:
    if node.op == "seq":
        pending: list[Node] = []
        _stream(node, pending, out)
        _flush(pending, out)
    elif node.op == "residual":
        for child in node.children:
            _walk(child, out)
        out.append(_unit([node], "residual { identity }", node.out_shape))
    elif node.op == "join":
        for child in node.children:
            _walk(child, out)
        out.append(_join_unit(node))
    elif node.op == "torchvision":  # a torchvision model is one unit: its parts are no layers of ours
        out.append(_unit([node]))
    elif node.children:  # any other container: its parts
        for child in node.children:
            _walk(child, out)
    else:
        out.append(_unit([node]))


def _stream(seq: Node, pending: list[Node], out: list[Unit]) -> None:
    """The layers of `seq` in order into units, a nested seq's (a block such as `norm() { bn }`) among them:
    the graph a runtime fuses is flat, so MobileNetV3's `pwconv norm hardswish` is one unit as ORT runs
    it, not a conv whose BatchNorm's in-model time holds the fused kernel's."""
    for child in seq.children:
        if child.op == "seq":
            _stream(child, pending, out)
        elif child.children:
            _flush(pending, out)
            _walk(child, out)
        elif pending and (child.op in FREE or child.op in _takes(pending)):
            pending.append(child)
        else:
            _flush(pending, out)
            pending.append(child)


def _takes(pending: list[Node]) -> tuple:
    """The ops the pending unit can still take in (a conv takes a bn, then an act)."""
    after = FUSED_AFTER.get(pending[0].op, ())
    last = max((after.index(n.op) for n in pending[1:] if n.op in after), default=-1)
    return after[last + 1:]


def _flush(pending: list[Node], out: list[Unit]) -> None:
    if pending:
        out.append(_unit(list(pending)))
        pending.clear()


def _join_unit(node: Node) -> Unit:
    """The join's own work (split, concat or element-wise), timed on identity branches: concat of
    branches of other widths is timed as split + concat of the same widths."""
    a = node.attrs
    mode = "mul" if a.get("gate") else a["mode"]
    h_w = tuple(node.out_shape[1:])
    if mode == "concat":
        widths = a.get("split") or [c.out_shape[0] for c in node.children]
        text = f"concat split({', '.join(map(str, widths))})" + " { identity }" * len(widths)
        shape = (sum(widths), *h_w)
    else:
        text = f"{mode}" + " { identity }" * max(2, len(node.children) - (1 if a.get("gate") else 0))
        shape = tuple(node.out_shape)
    return Unit(text, shape, 0, 2 * math.prod(shape), (node.path,))
