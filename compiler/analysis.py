"""Analysis of an elaborated model without torch: per-layer rows, totals, bytes, budgets."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import fileformat
from .expr import evaluate
from .tree import Model, Node


@dataclass
class Row:
    path: str
    type: str                 # the node's layer (conv, dws, residual, ...)
    depth: int
    output: tuple
    params: int
    macs: int
    activations: int  # output elements of this module for one sample

    def to_json(self) -> dict:
        return {"path": self.path, "type": self.type, "depth": self.depth, "output": list(self.output),
                "params": self.params, "macs": self.macs, "activations": self.activations}


@dataclass
class BudgetResult:
    name: str
    metric: str
    format: str | None
    limit: int | float
    value: int
    ok: bool
    top: list[tuple[str, str, int]] = field(default_factory=list)  # largest contributors (path, type, value)

    def to_json(self) -> dict:
        return {"name": self.name, "metric": self.metric, "format": self.format, "limit": self.limit,
                "value": self.value, "ok": self.ok,
                "top": [{"path": p, "type": k, "value": v} for p, k, v in self.top]}


@dataclass
class Analysis:
    model: str
    spec: str
    input: tuple
    params: int
    buffers: int
    macs: int
    activations: int
    bytes: dict[str, int]
    budgets: list[BudgetResult]
    rows: list[Row]
    param_values: dict

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.budgets)

    def to_json(self) -> dict:
        return {"model": self.model, "spec": self.spec, "input": list(self.input), "params": self.params,
                "buffers": self.buffers, "macs": self.macs, "activations": self.activations,
                "bytes": dict(self.bytes), "budgets": [b.to_json() for b in self.budgets],
                "ok": self.ok, "param_values": self.param_values, "layers": [r.to_json() for r in self.rows]}


def fold_pairs(root: Node) -> list[tuple[Node, Node]]:
    """(conv, bn) pairs where a 2-D BatchNorm directly follows a conv in the same sequence."""
    pairs = []
    for node in root.walk():
        if node.op != "seq":
            continue
        for a, b in zip(node.children, node.children[1:]):
            if a.op == "conv" and b.op == "bn" and b.attrs["dims"] == 3 and b.attrs["channels"] == a.attrs["out"]:
                pairs.append((a, b))
    return pairs


def weight_tensors(model: Model, fold_bn: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(state-dict name, shape) of every tensor a model file stores, in module order.

    With `fold_bn`, folded BatchNorms store nothing and their convs gain a bias.
    """
    tensors = [(name, t.shape) for name, t in model.root.state_tensors()]
    if not fold_bn:
        return tensors
    pairs = fold_pairs(model.root)
    dropped = {bn.path for _, bn in pairs}
    biased = {conv.path: conv.attrs["out"] for conv, _ in pairs if not conv.attrs["bias"]}
    out = []
    for name, shape in tensors:
        owner = name.rsplit(".", 1)[0]
        if owner in dropped:
            continue
        out.append((name, shape))
        if owner in biased and name.endswith(".weight"):
            out.append((f"{owner}.bias", (biased[owner],)))
    return out


def as_format(fmt: str | fileformat.WeightFormat) -> fileformat.WeightFormat:
    return fileformat.parse_format(fmt) if isinstance(fmt, str) else fmt


def file_metadata(model: Model, fmt: str | fileformat.WeightFormat) -> dict[str, str]:
    fmt = as_format(fmt)
    folded = [bn.path for _, bn in fold_pairs(model.root)] if fmt.fold_bn else []
    return fileformat.metadata(fmt=fmt, model=model.name, spec_source=model.source, syntax=model.syntax,
                               params=model.params, input_shape=model.input_shape, folded=folded)


def predicted_bytes(model: Model, fmt: str | fileformat.WeightFormat) -> int:
    """Exact size of the model file the runtime writes in format `fmt` (see fileformat)."""
    fmt = as_format(fmt)
    stored = fileformat.stored_tensors(weight_tensors(model, fmt.fold_bn), fmt)
    return fileformat.file_bytes(stored, file_metadata(model, fmt))


def _rows(root: Node) -> list[Row]:
    rows = []
    for node in root.walk():
        if node is root:
            continue
        rows.append(Row(node.path, node.layer, node.path.count(".") + 1, node.out_shape, node.params,
                        node.total_macs, math.prod(node.out_shape)))
    return rows


def _top(root: Node, metric: str, fmt: str | None, n: int = 3) -> list[tuple[str, str, int]]:
    per_elem = as_format(fmt).bits / 8 if fmt else 1
    values = []
    for leaf in root.leaves():
        if metric == "macs":
            v = leaf.macs
        elif metric == "params":
            v = leaf.params
        else:
            v = int((leaf.params + leaf.buffers) * per_elem)
        if v:
            values.append((leaf.path or "(model)", leaf.layer, v))
    return sorted(values, key=lambda item: -item[2])[:n]


def budgets(model: Model, measured_bytes: dict[str, int] | None = None) -> list[BudgetResult]:
    """Every budget of the spec against its value: predicted from the spec, or for file sizes the
    `measured_bytes` of written files (format name -> bytes) where given. The one budget evaluator."""
    root = model.root
    totals = {"params": root.params, "macs": root.total_macs}
    out = []
    for b in model.definition.budgets:
        limit = evaluate(b.limit, model.params)
        if b.metric == "bytes":
            name = as_format(b.format).name
            value = (measured_bytes or {}).get(name)
            value = predicted_bytes(model, b.format) if value is None else value
        else:
            value = totals[b.metric]
        out.append(BudgetResult(f"{b.title} <= {limit:,}", b.metric, b.format, limit, value, value <= limit,
                                _top(root, b.metric, b.format)))
    return out


def analyse(model: Model) -> Analysis:
    root = model.root
    byte_sizes = {fmt: predicted_bytes(model, fmt) for fmt in fileformat.SUMMARY_FORMATS}
    for b in model.definition.budgets:  # any other format a budget names
        if b.metric == "bytes" and b.format not in byte_sizes:
            byte_sizes[b.format] = predicted_bytes(model, b.format)
    totals = {"params": root.params, "macs": root.total_macs}
    leaves = root.leaves()
    return Analysis(model.name, model.spec.path, model.input_shape, totals["params"], root.buffers, totals["macs"],
                    sum(math.prod(n.out_shape) for n in leaves if n is not root), byte_sizes, budgets(model),
                    _rows(root), dict(model.params))
