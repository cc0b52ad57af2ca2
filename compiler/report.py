"""Rendering an analysis: a torchsummary-like table, or JSON."""
from __future__ import annotations

import json

from .analysis import Analysis
from .ops import fmt_shape


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def table(a: Analysis, max_depth: int | None = None) -> str:
    rows = [r for r in a.rows if max_depth is None or r.depth <= max_depth]
    header = ("Layer", "Type", "Output", "Params", "MACs")
    body = [("  " * (r.depth - 1) + r.path,
             r.type, fmt_shape(r.output), f"{r.params:,}", f"{r.macs:,}") for r in rows]
    align = ("<", "<", "<", ">", ">")
    if any(r.format for r in a.rows):  # a `precision` section: each layer's weight format
        header, align = header + ("Format",), align + ("<",)
        body = [b + (r.format or "",) for b, r in zip(body, rows)]
    if any(r.latency_ms is not None for r in a.rows):  # a latency budget: each layer's predicted share
        header, align = header + ("Latency ms",), align + (">",)
        body = [b + (f"{r.latency_ms:.4f}" if r.latency_ms is not None else "",) for b, r in zip(body, rows)]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(f"{c:{al}{w}}" for c, al, w in zip(cells, align, widths)).rstrip()

    rule = "-" * len(line(header))
    params = ", ".join(f"{k}={v}" for k, v in a.param_values.items())
    out = [f"model {a.model} ({a.spec})  input {fmt_shape(a.input)}" + (f"  [{params}]" if params else ""),
           rule, line(header), rule, *(line(b) for b in body), rule,
           f"Params:       {a.params:,} ({human(a.params)})",
           f"Buffers:      {a.buffers:,} (BatchNorm running statistics)",
           f"MACs:         {a.macs:,} ({human(a.macs)}) per sample",
           f"Activations:  {a.activations:,} elements per sample",
           "File bytes:   " + "   ".join(f"{fmt} {n:,}" for fmt, n in a.bytes.items())]
    if a.onnx_bytes:  # the deployed file, for the formats an `onnx(...)` budget names
        out.append("ONNX bytes:   " + "   ".join(f"{fmt} {n:,}" for fmt, n in a.onnx_bytes.items())
                   + "   (export format: weights; plus the class names' metadata)")
    for target, p in a.latency.items():
        estimated = f"; {p['estimated_units']} of {p['units']} units from their nearest" if p["estimated_units"] else ""
        out.append(f"Latency:      {target} {p['ms']:.3f} ms predicted ({p['threads']} thread(s), batch "
                   f"{p['batch']}; table {p['table']}{estimated})")
    if a.budgets:
        out.append("Budgets:")
        for b in a.budgets:
            pct = f"{100 * b.value / b.limit:.1f}%" if b.limit else "-"
            out.append(f"  {'ok  ' if b.ok else 'FAIL'}  {b.name}: {b.shown()} ({pct} of the limit)")
            if not b.ok:
                parts = [f"{p} ({k}) {b.shown(v)} ({100 * v / b.value:.1f}%)" for p, k, v in b.top]
                out.append("        largest: " + ", ".join(parts))
    return "\n".join(out)


def to_json(a: Analysis) -> str:
    return json.dumps(a.to_json(), indent=2)
