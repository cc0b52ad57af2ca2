"""Emit an elaborated model back as DSL text, every number concrete.

Used by the steps that change an architecture (prune, lowrank): they rewrite the
elaborated tree and emit it, so the result is a spec that compiles, analyses and
builds like any other -- with the same module paths, so weights map by name.
Positional children (names "0", "1", ...) are emitted unlabelled, in order.
"""
from __future__ import annotations

from .expr import evaluate
from .layers import fmt_shape
from .tree import Model, Node


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _num(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _arg(node: Node, arg: str, params: dict) -> str:
    """An argument as the spec wrote it (a model parameter's name) while it still has that value."""
    value = node.attrs[arg]
    symbol = node.symbols.get(arg)
    return symbol if symbol is not None and params.get(symbol) == value else str(value)


def leaf(node: Node, params: dict | None = None) -> str:
    op, a = node.op, node.attrs
    params = params or {}
    if op == "conv":
        if node.layer == "dwconv" and a["groups"] == a["in"]:
            return (f"dwconv(kernel={a['kernel']}, stride={a['stride']}, padding={a['padding']}, "
                    f"dilation={a['dilation']}, bias={_bool(a['bias'])}, multiplier={a['out'] // a['in']})")
        if node.layer == "pwconv" and a["kernel"] == 1 and a["stride"] == 1 and a["groups"] == 1:
            return f"pwconv({_arg(node, 'out', params)}, bias={_bool(a['bias'])}, scale=false)"
        return (f"conv({_arg(node, 'out', params)}, kernel={a['kernel']}, stride={a['stride']}, "
                f"padding={a['padding']}, "
                f"dilation={a['dilation']}, groups={a['groups']}, bias={_bool(a['bias'])}, scale=false)")
    if op == "linear":
        return f"linear({_arg(node, 'out', params)}, bias={_bool(a['bias'])}, scale=false)"
    if op == "bn":
        return f"bn(eps={_num(a['eps'])}, momentum={_num(a['momentum'])}, affine={_bool(a['affine'])})"
    if op == "act":
        return f"leaky_relu({_num(a['slope'])})" if a["fn"] == "leaky_relu" else a["fn"]
    if op in ("maxpool", "avgpool"):
        return f"{op}(kernel={a['kernel']}, stride={a['stride']}, padding={a['padding']})"
    if op == "dropout":
        return f"dropout({_num(a['p'])})"
    if op in ("gap", "flatten", "identity"):
        return op
    if op == "torchvision":
        args = ", ".join(f"{k}={_num(v) if not isinstance(v, bool) else _bool(v)}" for k, v in a["kwargs"].items())
        return f"torchvision {a['name']}({args})"
    raise ValueError(f"cannot emit op {op!r}")


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
    header = ", ".join(f"{k}: {types[k]} = {_bool(v) if isinstance(v, bool) else _num(v)}"
                       for k, v in model.params.items())
    params = model.params  # the names emitted arguments may use
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines.append(f"model {name or model.name}({header}) {{")
    lines.append(f"    input {fmt_shape(model.input_shape)}")
    for b in model.definition.budgets:
        lines.append(f"    budget {b.title} <= {_num(evaluate(b.limit, model.params))}")
    if root.op == "torchvision" and root.path == "":
        lines.append(f"    {leaf(root, params)}")
    else:
        _body(root.children, "    ", params, lines)
    lines.append("}")
    return "\n".join(lines) + "\n"
