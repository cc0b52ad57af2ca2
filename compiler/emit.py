"""Emit an elaborated model back as DSL text, every number concrete.

Used by the steps that change an architecture (prune, lowrank): they rewrite the
elaborated tree and emit it, so the result is a spec that compiles, analyses and
builds like any other -- with the same module paths, so weights map by name.
Positional children (names "0", "1", ...) are emitted unlabelled, in order.
"""
from __future__ import annotations

from .expr import evaluate
from .ops import fmt_shape, record
from .ops.base import boolean, number
from .tree import Model, Node


def leaf(node: Node, params: dict | None = None) -> str:
    """A leaf as DSL, through its op record; an argument the spec wrote as a model parameter stays
    that parameter while it still has the parameter's value."""
    params = params or {}

    def arg(name: str) -> str:
        value = node.attrs[name]
        symbol = node.symbols.get(name)
        return symbol if symbol is not None and params.get(symbol) == value else str(value)

    try:
        return record(node.op).emit(node, arg)
    except KeyError as err:
        raise ValueError(f"cannot emit op {node.op!r}: {err}") from None


def _body(children: list[Node], indent: str, params, lines: list[str]) -> None:
    for index, child in enumerate(children):
        if child.name.isdigit():
            if int(child.name) != index:
                raise ValueError(f"{child.path}: positional name {child.name} at position {index}")
            label = ""
        else:
            label = f"{child.name}: "
        _node(child, indent, label, params, lines)


def _node(node: Node, indent: str, label: str, params, lines: list[str]) -> None:
    if node.op == "residual":
        parts = {c.name: c for c in node.children}
        lines.append(f"{indent}{label}residual {{")
        _body(parts["body"].children, indent + "    ", params, lines)
        if "shortcut" in parts:
            lines.append(f"{indent}}} shortcut {{")
            _body(parts["shortcut"].children, indent + "    ", params, lines)
        lines.append(f"{indent}}}")
    elif node.op == "join":
        a = node.attrs
        if a["gate"]:
            head, branches = "gate", node.children[1:]
        else:
            split = "" if a["split"] is None else " split(" + ", ".join(map(str, a["split"])) + ")"
            head, branches = a["mode"] + split, node.children
        lines.append(f"{indent}{label}{head} {{")
        for i, branch in enumerate(branches):
            if i:
                lines.append(f"{indent}}} {{")
            _body(branch.children, indent + "    ", params, lines)
        lines.append(f"{indent}}}")
    elif node.op == "seq":
        lines.append(f"{indent}{label}{{  # {node.layer}")
        _body(node.children, indent + "    ", params, lines)
        lines.append(f"{indent}}}")
    else:
        lines.append(f"{indent}{label}{leaf(node, params)}")


def emit(model: Model, root: Node | None = None, *, name: str | None = None, comment: str = "") -> str:
    """DSL text for `model` (or for a rewritten tree `root` of it)."""
    root = root or model.root
    types = {p.name: p.type for p in model.definition.params}
    header = ", ".join(f"{k}: {types[k]} = {boolean(v) if isinstance(v, bool) else number(v)}"
                       for k, v in model.params.items())
    params = model.params  # the names emitted arguments may use
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines.append(f"model {name or model.name}({header}) {{")
    lines.append(f"    input {fmt_shape(model.input_shape)}")
    p = model.definition.precision
    if p is not None:
        rules = ", ".join(f'"{r.pattern}": {r.format}' for r in p.rules)
        lines.append(f"    precision {p.default}" + (f" {{ {rules} }}" if rules else ""))
    for b in model.definition.budgets:
        lines.append(f"    budget {b.title} <= {number(evaluate(b.limit, model.params))}")
    if root.op == "torchvision" and root.path == "":
        lines.append(f"    {leaf(root, params)}")
    else:
        _body(root.children, "    ", params, lines)
    lines.append("}")
    return "\n".join(lines) + "\n"
