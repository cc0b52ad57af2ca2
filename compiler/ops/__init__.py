"""The op records: one module per family of layers (conv, linear, norm, activation, pool, shape).

`LAYERS` maps a layer name of the language to its `LayerKind` (arguments, shape rule); `OPS`
maps the op it resolves to onto its `OpRecord` (tensors, MACs, DSL, pruning role). The torch
side keys its tables by the same names: builders by op in compiler/build.py, weight slicers
by pruning role in runtime/rewrite/prune.py. An op without a record is an error, never a silent default.
"""
from __future__ import annotations

from . import activation, conv, linear, norm, pool, shape
from .base import (
    BLOCKS,
    PASSES,
    PRODUCES,
    REQUIRED,
    ROLES,
    WEIGHTED,
    ArgSpec,
    LayerError,
    LayerKind,
    OpRecord,
    Tensor,
    fmt_shape,
)

_FAMILIES = (conv, norm, activation, pool, shape, linear)
LAYERS: dict[str, LayerKind] = {k.name: k for f in _FAMILIES for k in f.LAYER_KINDS}
OPS: dict[str, OpRecord] = {o.name: o for f in _FAMILIES for o in f.OPS}


def record(op: str) -> OpRecord:
    if op not in OPS:
        raise KeyError(f"no op record for `{op}`: add one in compiler/ops (see .github/CONTRIBUTING.md)")
    return OPS[op]


def resolve_layer(name: str, shape: tuple, **args) -> tuple[str, dict, tuple]:
    """(op, attrs, out_shape) of layer `name` written with `args` (the rest at their defaults), checked
    and resolved by its record: for the layers the compiler writes itself (shortcuts, low-rank factors)."""
    kind = LAYERS[name]
    values = {a.name: args.pop(a.name, a.default) for a in kind.args}
    missing = [n for n, v in values.items() if v is REQUIRED]
    if args or missing:
        raise TypeError(f"{name}: unknown arguments {sorted(args)}, missing {missing}")
    kind.check(values)
    values.pop("scale", None)
    return kind.resolve(shape, values)


def tensors(op: str, attrs: dict) -> list[Tensor]:
    """The state-dict entries a leaf op owns, in torch's registration order."""
    return record(op).tensors(attrs)


def macs(op: str, attrs: dict, out_shape: tuple) -> int:
    """Multiply-accumulates of one forward pass of one sample (conv and linear only): the
    convention of torch.utils.flop_counter, which counts 2 flops per MAC and ignores biases,
    normalisation and activations."""
    return record(op).macs(attrs, out_shape)


__all__ = ["BLOCKS", "LAYERS", "OPS", "PASSES", "PRODUCES", "REQUIRED", "ROLES", "WEIGHTED", "ArgSpec", "LayerError",
           "LayerKind", "OpRecord", "Tensor", "fmt_shape", "macs", "record", "resolve_layer", "tensors"]
