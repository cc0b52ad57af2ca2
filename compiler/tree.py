"""The elaborated tree: concrete layers with shapes and exact counts, and the model around it."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import ir
from .errors import Span
from .ops import Tensor, macs, resolve_layer, tensors


@dataclass
class Node:
    """One module of the built model. Containers have children; leaves have an op."""

    name: str                 # local name (label or position)
    path: str                 # dotted module path, '' for the root
    layer: str                # what the spec wrote: layer or block name, 'repeat', 'residual', ...
    op: str                   # leaf ops as in layers.py; containers: 'seq' | 'residual' | 'torchvision'
    in_shape: tuple
    out_shape: tuple
    attrs: dict = field(default_factory=dict)
    children: list["Node"] = field(default_factory=list)
    span: Span | None = None
    tensors: list[Tensor] = field(default_factory=list)  # own state-dict entries (local names)
    macs: int = 0             # own MACs (leaves; torchvision refs hold their total)
    symbols: dict = field(default_factory=dict)  # argument -> model parameter it was written as (`linear(classes)`)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def leaves(self):
        return [n for n in self.walk() if not n.children]

    def state_tensors(self):
        """(full name, Tensor) for every state-dict entry under this node, in module order."""
        for n in self.walk():
            for t in n.tensors:
                yield (f"{n.path}.{t.name}" if n.path else t.name), t

    @property
    def params(self) -> int:
        return sum(t.numel for _, t in self.state_tensors() if t.is_param)

    @property
    def buffers(self) -> int:
        return sum(t.numel for _, t in self.state_tensors() if not t.is_param)

    @property
    def total_macs(self) -> int:
        return sum(n.macs for n in self.walk())


def op_node(name: str, path: str, layer: str, op: str, in_shape: tuple, out_shape: tuple, attrs: dict,
            span: Span | None = None, symbols: dict | None = None) -> Node:
    """A leaf whose tensors and MACs come from its op's record."""
    return Node(name, path, layer, op, in_shape, out_shape, attrs=attrs, span=span, tensors=tensors(op, attrs),
                macs=macs(op, attrs, out_shape), symbols=symbols or {})


def layer_node(name: str, path: str, layer: str, in_shape: tuple, span: Span | None = None, **args) -> Node:
    """A leaf the compiler writes itself: layer `layer` with `args`, resolved through its record."""
    op, attrs, out_shape = resolve_layer(layer, in_shape, **args)
    return op_node(name, path, layer, op, in_shape, out_shape, attrs, span)


@dataclass
class Model:
    """An elaborated model: its tree plus what it was elaborated from."""

    name: str
    root: Node
    input_shape: tuple
    params: dict[str, object]
    definition: ir.ModelDef
    spec: ir.SpecFile
    source: str = ""          # spec text, embedded in model files
    syntax: str = "dsl"       # dsl | yaml: how to read `source` back

