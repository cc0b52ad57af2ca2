"""Emit an elaborated model back as DSL text, every number concrete.

Used by the steps that change an architecture (prune, lowrank): they rewrite the
elaborated tree and emit it, so the result is a spec that compiles, analyses and
builds like any other -- with the same module paths, so weights map by name.
Positional children (names "0", "1", ...) are emitted unlabelled, in order.
"""
from __future__ import annotations

from .tree import Model, Node
from .layers import fmt_shape


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _num(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def leaf(node: Node, classes: int | None = None) -> str:
    op, a = node.op, node.attrs
    if op == "conv":
        if node.kind == "dwconv" and a["groups"] == a["in"]:
            return (f"dwconv(kernel={a['kernel']}, stride={a['stride']}, padding={a['padding']}, "
                    f"dilation={a['dilation']}, bias={_bool(a['bias'])}, multiplier={a['out'] // a['in']})")
        if node.kind == "pwconv" and a["kernel"] == 1 and a["stride"] == 1 and a["groups"] == 1:
            return f"pwconv({a['out']}, bias={_bool(a['bias'])}, scale=false)"
        return (f"conv({a['out']}, kernel={a['kernel']}, stride={a['stride']}, padding={a['padding']}, "
                f"dilation={a['dilation']}, groups={a['groups']}, bias={_bool(a['bias'])}, scale=false)")
    if op == "linear":
        out = "classes" if classes is not None and a["out"] == classes else str(a["out"])
        return f"linear({out}, bias={_bool(a['bias'])}, scale=false)"
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


def _body(children: list[Node], indent: str, classes, lines: list[str]) -> None:
    for index, child in enumerate(children):
        if child.name.isdigit():
            if int(child.name) != index:
                raise ValueError(f"{child.path}: positional name {child.name} at position {index}")
            label = ""
        else:
            label = f"{child.name}: "
        _node(child, indent, label, classes, lines)


def _node(node: Node, indent: str, label: str, classes, lines: list[str]) -> None:
    if node.op == "residual":
        parts = {c.name: c for c in node.children}
        lines.append(f"{indent}{label}residual {{")
        _body(parts["body"].children, indent + "    ", classes, lines)
        if "shortcut" in parts:
            lines.append(f"{indent}}} shortcut {{")
            _body(parts["shortcut"].children, indent + "    ", classes, lines)
        lines.append(f"{indent}}}")
    elif node.op == "seq":
        lines.append(f"{indent}{label}{{  # {node.kind}")
        _body(node.children, indent + "    ", classes, lines)
        lines.append(f"{indent}}}")
    else:
        lines.append(f"{indent}{label}{leaf(node, classes)}")


def emit(model: Model, root: Node | None = None, *, name: str | None = None, comment: str = "") -> str:
    """DSL text for `model` (or for a rewritten tree `root` of it)."""
    root = root or model.root
    types = {p.name: p.type for p in model.definition.params}
    params = ", ".join(f"{k}: {types[k]} = {_bool(v) if isinstance(v, bool) else _num(v)}"
                       for k, v in model.params.items())
    classes = model.params.get("classes") if types.get("classes") == "int" else None
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines.append(f"model {name or model.name}({params}) {{")
    lines.append(f"    input {fmt_shape(model.input_shape)}")
    from .expr import evaluate

    for b in model.definition.budgets:
        lines.append(f"    budget {b.title} <= {_num(evaluate(b.limit, model.params))}")
    if root.op == "torchvision" and root.path == "":
        lines.append(f"    {leaf(root, classes)}")
    else:
        _body(root.children, "    ", classes, lines)
    lines.append("}")
    return "\n".join(lines) + "\n"
