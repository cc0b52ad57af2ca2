"""Analysis of an elaborated model without torch: per-layer rows, totals, bytes, budgets."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import fileformat
from .elaborate import Model, Node
from .expr import evaluate


@dataclass
class Row:
    path: str
    kind: str
    depth: int
    output: tuple
    params: int
    macs: int
    activations: int  # output elements of this module for one sample

    def to_json(self) -> dict:
        return {"path": self.path, "type": self.kind, "depth": self.depth, "output": list(self.output),
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


def weight_tensors(model: Model) -> list[tuple[str, tuple[int, ...]]]:
    """(state-dict name, shape) of every tensor a model file stores, in module order."""
    return [(name, t.shape) for name, t in model.root.state_tensors()]


def file_metadata(model: Model, fmt: str) -> dict[str, str]:
    return fileformat.metadata(fmt=fmt, model=model.name, spec_source=model.source, syntax=model.syntax,
                               params=model.params, input_shape=model.input_shape)


def predicted_bytes(model: Model, fmt: str) -> int:
    """Exact size of the model file the runtime writes in format `fmt` (see fileformat)."""
    stored = fileformat.stored_tensors(weight_tensors(model), fmt)
    return fileformat.file_bytes(stored, file_metadata(model, fmt))


def _rows(root: Node) -> list[Row]:
    rows = []
    for node in root.walk():
        if node is root:
            continue
        rows.append(Row(node.path, node.kind, node.path.count(".") + 1, node.out_shape, node.params,
                        node.total_macs, math.prod(node.out_shape)))
    return rows


def _top(root: Node, metric: str, fmt: str | None, n: int = 3) -> list[tuple[str, str, int]]:
    per_elem = {"fp32": 4, "fp16": 2, "int8": 1}.get(fmt or "", 1)
    values = []
    for leaf in root.leaves():
        if metric == "macs":
            v = leaf.macs
        elif metric == "params":
            v = leaf.params
        else:
            v = (leaf.params + leaf.buffers) * per_elem
        if v:
            values.append((leaf.path or "(model)", leaf.kind, v))
    return sorted(values, key=lambda item: -item[2])[:n]


def analyse(model: Model) -> Analysis:
    root = model.root
    byte_sizes = {fmt: predicted_bytes(model, fmt) for fmt in fileformat.FORMATS}
    totals = {"params": root.params, "macs": root.total_macs}
    budgets = []
    for b in model.definition.budgets:
        limit = evaluate(b.limit, model.params)
        value = byte_sizes[b.format] if b.metric == "bytes" else totals[b.metric]
        ok = value <= limit
        budgets.append(BudgetResult(f"{b.title} <= {limit:,}", b.metric, b.format, limit, value, ok,
                                    _top(root, b.metric, b.format)))
    leaves = root.leaves()
    return Analysis(model.name, model.spec.path, model.input_shape, totals["params"], root.buffers, totals["macs"],
                    sum(math.prod(n.out_shape) for n in leaves if n is not root), byte_sizes, budgets,
                    _rows(root), dict(model.params))
