"""Analysis of an elaborated model without torch: per-layer rows, totals, bytes, budgets."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import fileformat
from .expr import evaluate
from .fileformat import SPEC, WeightFormat, as_format, model_format, predicted_bytes, spec_format
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
    format: str | None = None  # with a `precision` section: the format of the layer's weights
    latency_ms: float | None = None  # with a latency budget: the layer's share of the predicted latency

    def to_json(self) -> dict:
        out = {"path": self.path, "type": self.type, "depth": self.depth, "output": list(self.output),
               "params": self.params, "macs": self.macs, "activations": self.activations}
        if self.format is not None:
            out["format"] = self.format
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        return out


@dataclass
class BudgetResult:
    name: str
    metric: str
    format: str | None
    limit: int | float
    value: int | float
    ok: bool
    top: list[tuple[str, str, int]] = field(default_factory=list)  # largest contributors (path, type, value)

    def shown(self, value: int | float | None = None) -> str:
        """A value of this budget's metric as people read it: 1,234 or 0.412 ms."""
        value = self.value if value is None else value
        return f"{value:.3f} ms" if self.metric == "latency" else f"{value:,}"

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
    onnx_bytes: dict[str, int] = field(default_factory=dict)  # the deployed ONNX file, for formats budgets name
    latency: dict[str, dict] = field(default_factory=dict)  # target -> predicted ms and its table, for budgets

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.budgets)

    def to_json(self) -> dict:
        return {"model": self.model, "spec": self.spec, "input": list(self.input), "params": self.params,
                "buffers": self.buffers, "macs": self.macs, "activations": self.activations,
                "bytes": dict(self.bytes), "onnx_bytes": dict(self.onnx_bytes), "latency": dict(self.latency),
                "budgets": [b.to_json() for b in self.budgets],
                "ok": self.ok, "param_values": self.param_values, "layers": [r.to_json() for r in self.rows]}


def _rows(root: Node, precision: WeightFormat | None = None, latency_by_path: dict | None = None) -> list[Row]:
    rows = []
    for node in root.walk():
        if node is root:
            continue
        fmt = None
        if precision is not None and node.tensors and not node.children:
            fmt = precision.of(f"{node.path}.{node.tensors[0].name}" if node.path else node.tensors[0].name).name
        ms = None
        if latency_by_path is not None:
            ms = sum(v for p, v in latency_by_path.items() if p == node.path or p.startswith(node.path + "."))
        rows.append(Row(node.path, node.layer, node.path.count(".") + 1, node.out_shape, node.params,
                        node.total_macs, math.prod(node.out_shape), fmt, ms))
    return rows


def format_key(fmt: str) -> str:
    """How budgets and measured sizes name a format: `spec`, or the format's canonical name."""
    return fmt if fmt == SPEC else as_format(fmt).name


def _top(root: Node, metric: str, fmt: WeightFormat | None, n: int = 3) -> list[tuple[str, str, int]]:
    per_elem = fmt.bits / 8 if fmt else 1  # the default's width: a ranking, not a size
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


def onnx_key(fmt: str) -> str:
    """How measured sizes name the deployed ONNX file of a weight format: `onnx(int8)`."""
    return f"onnx({format_key(fmt)})"


def predicted_onnx_bytes(model: Model, fmt: str) -> int:
    """The ONNX file the export step writes (`format: weights`) from a model file of format `fmt`, before
    the run's class names join its metadata (the export step checks the written file again)."""
    from .onnxgraph import predicted_bytes as onnx_bytes  # imports onnx: only for the budgets that name it

    return onnx_bytes(model, fmt)


def predicted_latency(model: Model, target: str):
    """compiler.latency's prediction on this machine's table for `target` (LatencyError without one)."""
    from . import latency

    return latency.predict(model, latency.cached_table(target))


def budgets(model: Model, measured_bytes: dict[str, int] | None = None, top: bool = True,
            latencies: dict | None = None) -> list[BudgetResult]:
    """Every budget of the spec against its value: predicted from the spec, or for file sizes the
    `measured_bytes` of written files (format name, or `onnx(format)`, -> bytes) where given. The one
    budget evaluator. `top=False` leaves out the largest contributors (a search checks thousands of
    configurations); `latencies`: predictions already made (target -> compiler.latency.Prediction)."""
    root = model.root
    out = []
    for b in model.definition.budgets:
        limit = evaluate(b.limit, model.params)
        if b.metric == "latency":
            limit = limit * b.scale
            prediction = (latencies or {}).get(b.format) or predicted_latency(model, b.format)
            value = prediction.ms
            largest = sorted(((p, "unit", ms) for p, ms in prediction.by_path().items()), key=lambda t: -t[2])[:3]
            shown = f"{limit:g} ms"
        else:
            if b.metric == "bytes":
                value = (measured_bytes or {}).get(format_key(b.format))
                value = predicted_bytes(model, b.format) if value is None else value
            elif b.metric == "onnx":
                value = (measured_bytes or {}).get(onnx_key(b.format))
                value = predicted_onnx_bytes(model, b.format) if value is None else value
            else:  # walked only for the budgets that need it
                value = root.params if b.metric == "params" else root.total_macs
            largest = _top(root, b.metric, model_format(model, b.format) if b.format else None) if top else []
            whole = isinstance(limit, float) and limit.is_integer() and abs(limit) < 1e18  # `1e6` reads as 1,000,000
            shown = f"{limit:,.0f}" if whole else f"{limit:,}"
        out.append(BudgetResult(f"{b.title} <= {shown}", b.metric, b.format, limit, value, value <= limit,
                                largest if top else []))
    return out


def analyse(model: Model) -> Analysis:
    root = model.root
    byte_sizes = {fmt: predicted_bytes(model, fmt) for fmt in fileformat.SUMMARY_FORMATS}
    if model.definition.precision is not None:
        byte_sizes[SPEC] = predicted_bytes(model, SPEC)
    for b in model.definition.budgets:  # any other format a budget names
        if b.metric == "bytes" and b.format not in byte_sizes:
            byte_sizes[b.format] = predicted_bytes(model, b.format)
    onnx_sizes = {format_key(b.format): predicted_onnx_bytes(model, b.format)
                  for b in model.definition.budgets if b.metric == "onnx"}
    measured = {onnx_key(f): n for f, n in onnx_sizes.items()}
    predictions = {b.format: predicted_latency(model, b.format)
                   for b in model.definition.budgets if b.metric == "latency"}
    first = next(iter(predictions.values()), None)  # the layer column shows the first target's shares
    totals = {"params": root.params, "macs": root.total_macs}
    leaves = root.leaves()
    return Analysis(model.name, model.spec.path, model.input_shape, totals["params"], root.buffers, totals["macs"],
                    sum(math.prod(n.out_shape) for n in leaves if n is not root), byte_sizes,
                    budgets(model, measured, latencies=predictions),
                    _rows(root, spec_format(model) if model.definition.precision else None,
                          first.by_path() if first is not None else None), dict(model.params),
                    onnx_sizes, {t: p.to_json() for t, p in predictions.items()})
