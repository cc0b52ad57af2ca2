"""YAML front end: the same language as the DSL, written as YAML.

    blocks:
      dws:
        params: {out: int}
        layers:
          - {dwconv: 3, name: dw}
          - bn
          - relu6
          - {pwconv: out, name: pw}
    model:
      name: student
      params: {classes: {type: int, default: 11}}
      input: 3x256x256
      budgets: {"bytes(int8)": 300000}
      layers:
        - {conv: {out: 16, kernel: 3}}
        - {dws: 32, repeat: 2}

A layer is a name (`bn`) or a one-key mapping from the layer or block name to its
arguments: a scalar (the first argument), a list (positional) or a mapping (by name);
`name` labels it and `repeat` repeats it. String values are DSL expressions.
Nodes are composed (not just loaded) so every error keeps its line and column.
"""
from __future__ import annotations

import math

import yaml

from .. import ir
from ..errors import Diagnostic, Diagnostics, Span, SpecError, did_you_mean
from ..limits import NoAliasLoader
from .dsl import parse_expression, parse_space

_ELEMENT_KEYS = {"name", "repeat"}
_TERM_OPTIONS = ("project", "shortcut", "args", "split")  # keys beside a term's name
_JOINS = ("concat", "add", "mul")


class _YamlConverter:
    def __init__(self, path: str, diags: Diagnostics):
        self.path, self.diags = path, diags

    def span(self, node) -> Span:
        m = node.start_mark
        end = node.end_mark.column + 1 if node.end_mark.line == m.line else None
        return Span(self.path, m.line + 1, m.column + 1, end)

    # scalars
    def value(self, node) -> ir.Expr:
        span = self.span(node)
        if not isinstance(node, yaml.ScalarNode):
            self.diags.error("expected a value, got a " + _kind(node), span,
                             expected="a number, `true`/`false` or an expression string")
            return ir.Num(value=0, span=span)
        tag, text = node.tag, node.value
        if tag.endswith(":bool"):
            return ir.Bool(value=text.lower() in ("true", "yes", "on"), span=span)
        if tag.endswith(":int") or tag.endswith(":float"):
            try:  # YAML 1.1 also reads 017 (octal) and 1:30 (base 60) as numbers; Python does not
                number = int(text.replace("_", ""), 0) if tag.endswith(":int") else float(text.replace("_", ""))
            except ValueError:
                number = None
            if number is None or (isinstance(number, float) and not math.isfinite(number)):
                self.diags.error(f"`{text}` is not a number nccompile reads", span,
                                 expected="a plain decimal number such as 17 or 0.5")
                return ir.Num(value=0, span=span)
            return ir.Num(value=number, span=span)
        try:
            return parse_expression(text, span)
        except SpecError as err:
            self.diags.items.extend(err.diagnostics)
            return ir.Num(value=0, span=span)

    def text(self, node, what: str, default: str) -> str:
        """A scalar's text (a name, a type): anything else is an error at its place."""
        if isinstance(node, yaml.ScalarNode):
            return node.value
        self.diags.error(f"{what} must be a plain value, got a {_kind(node)}", self.span(node))
        return default

    def flag(self, node, what: str) -> bool:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":bool"):
            return node.value.lower() in ("true", "yes", "on")
        self.diags.error(f"{what} must be true or false", self.span(node))
        return False

    def mapping(self, node, what: str) -> list[tuple[str, object, object]]:
        if not isinstance(node, yaml.MappingNode):
            self.diags.error(f"{what} must be a mapping, got a {_kind(node)}", self.span(node))
            return []
        out, seen = [], set()
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.diags.error(f"a key of {what} must be a name, got a {_kind(k)}", self.span(k))
                continue
            if k.value in seen:
                self.diags.error(f"`{k.value}` appears twice in {what}", self.span(k), hint="keep one of them")
                continue
            seen.add(k.value)
            out.append((k.value, k, v))
        return out

    def sequence(self, node, what: str) -> list:
        if not isinstance(node, yaml.SequenceNode):
            self.diags.error(f"{what} must be a list, got a {_kind(node)}", self.span(node))
            return []
        return node.value

    # structure
    def params(self, node) -> list[ir.ParamDecl]:
        out = []
        for name, knode, vnode in self.mapping(node, "params"):
            default = space = None
            if isinstance(vnode, yaml.ScalarNode):
                type_ = vnode.value
            else:
                fields = {k: v for k, _, v in self.mapping(vnode, f"param `{name}`")}
                for key in fields.keys() - {"type", "default", "in"}:
                    self.diags.error(f"unknown key `{key}` in param `{name}`", self.span(fields[key]),
                                     expected="`type`, `default` and `in`",
                                     hint=did_you_mean(key, ["type", "default", "in"]))
                type_ = self.text(fields["type"], f"the type of param `{name}`", "float") if "type" in fields \
                    else "float"
                if "default" in fields:
                    default = self.value(fields["default"])
                if "in" in fields:
                    space = self.space(fields["in"], name)
            out.append(ir.ParamDecl(name=name, type=type_, default=default, space=space, span=self.span(knode)))
        return out

    def space(self, node, name: str) -> ir.ParamSpace | None:
        """`in: [3, 5]`, or `in: 8..64 step 8` (the DSL's text)."""
        if isinstance(node, yaml.SequenceNode):
            return ir.ParamSpace(values=[self.value(v) for v in node.value], span=self.span(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                return parse_space(str(node.value), self.span(node))
            except SpecError as err:
                for d in err.diagnostics:
                    self.diags.error(d.message, d.span, expected=d.expected)
                return None
        self.diags.error(f"the space of param `{name}` must be a list or a range", self.span(node),
                         expected="`[3, 5]` or `8..64 step 8`")
        return None

    def args(self, node) -> list[ir.Arg]:
        if isinstance(node, yaml.ScalarNode):
            if node.value in ("", "~", "null") and node.tag.endswith(":null"):
                return []
            return [ir.Arg(value=self.value(node), span=self.span(node))]
        if isinstance(node, yaml.SequenceNode):
            return [ir.Arg(value=self.value(v), span=self.span(v)) for v in node.value]
        return [ir.Arg(name=k, value=self.value(v), span=self.span(kn))
                for k, kn, v in self.mapping(node, "arguments")]

    def elements(self, node) -> list[ir.Element]:
        return [e for e in (self.element(n) for n in self.sequence(node, "layers")) if e is not None]

    def element(self, node) -> ir.Element | None:
        span = self.span(node)
        if isinstance(node, yaml.ScalarNode):
            return ir.Element(term=ir.Call(name=node.value, span=span), span=span)
        items = self.mapping(node, "a layer")
        extras = {k: v for k, _, v in items if k in _ELEMENT_KEYS}
        main = [(k, kn, v) for k, kn, v in items if k not in _ELEMENT_KEYS | set(_TERM_OPTIONS)]
        if len(main) != 1:
            names = ", ".join(f"`{k}`" for k, _, _ in main) or "none"
            self.diags.error(f"a layer mapping needs exactly one layer or block name, found {names}", span,
                             hint="write other layers as separate list items")
            return None
        key, knode, value = main[0]
        others = {k: v for k, _, v in items}
        kspan = self.span(knode)
        if key == "group":
            term = ir.Group(elements=self.elements(value), span=kspan)
        elif key == "residual":
            project = others.get("project")
            shortcut = others.get("shortcut")
            term = ir.Residual(project=project is not None and self.flag(project, "`project`"),
                               body=self.elements(value),
                               shortcut=self.elements(shortcut) if shortcut is not None else None, span=kspan)
        elif key in _JOINS:  # concat: [[branch layers], [branch layers]], split: true | [sizes]
            branches = [self.elements(b) for b in self.sequence(value, f"the branches of `{key}`")]
            if len(branches) < 2:
                self.diags.error(f"`{key}` needs at least two branches (lists of layers)", kspan,
                                 hint="write an empty list [] for an identity branch")
            term = ir.Join(mode=key, split=self.split(others["split"]) if "split" in others else None,
                           branches=branches, span=kspan)
        elif key == "gate":
            term = ir.Join(mode="mul", branches=[[], self.elements(value)], gate=True, span=kspan)
        elif key == "torchvision":
            args = self.args(others["args"]) if "args" in others else []
            if isinstance(value, yaml.ScalarNode):
                name = value.value
            else:  # `torchvision: {name: resnet18, ...}`: the arguments go beside it, under `args`
                name = "?"
                self.diags.error(f"`torchvision` takes a model name, got a {_kind(value)}", self.span(value),
                                 expected="a torchvision model name, e.g. `torchvision: resnet18`",
                                 hint="give its keyword arguments beside it: "
                                      "`{torchvision: resnet18, args: {num_classes: classes}}`")
            term = ir.TorchvisionRef(name=name, args=args, span=self.span(value))
        else:
            term = ir.Call(name=key, args=self.args(value), span=kspan)
        allowed = {"residual": ("project", "shortcut"), "torchvision": ("args",)}.get(
            key, ("split",) if key in _JOINS else ())
        for extra in _TERM_OPTIONS:
            if extra in others and extra not in allowed:
                self.diags.error(f"`{extra}` does not apply to `{key}`", self.span(others[extra]))
        label = self.text(extras["name"], "a layer's `name`", "_") if "name" in extras else None
        repeat = self.value(extras["repeat"]) if "repeat" in extras else None
        return ir.Element(label=label, term=term, repeat=repeat, span=kspan)

    def split(self, node) -> list[ir.Arg] | None:
        """`split: true` (equal shares) or `split: [24, 40]`."""
        if isinstance(node, yaml.SequenceNode):
            return [ir.Arg(value=self.value(v), span=self.span(v)) for v in node.value]
        return [] if self.flag(node, "`split`") else None

    def model(self, node) -> ir.ModelDef:
        fields = {k: (kn, v) for k, kn, v in self.mapping(node, "model")}
        known = {"name", "params", "input", "width_mult", "round_to", "budgets", "layers", "precision"}
        for key in fields.keys() - known:
            self.diags.error(f"unknown key `{key}` in model", self.span(fields[key][0]),
                             expected=", ".join(f"`{k}`" for k in sorted(known)), hint=did_you_mean(key, known))
        out: dict = {"name": self.text(fields["name"][1], "the model's `name`", "model") if "name" in fields
                     else "model"}
        out["span"] = self.span(fields["name"][1] if "name" in fields else node)
        if "params" in fields:
            out["params"] = self.params(fields["params"][1])
        if "input" in fields:
            out["input"] = self.shape(fields["input"][1])
        if "width_mult" in fields:
            out["width_mult"] = self.value(fields["width_mult"][1])
        if "round_to" in fields:
            out["round_to"] = self.value(fields["round_to"][1])
        budgets = []
        if "budgets" in fields:
            for title, kn, v in self.mapping(fields["budgets"][1], "budgets"):
                metric, fmt = title, None
                if "(" in title and title.endswith(")"):
                    metric, fmt = title[:-1].split("(", 1)
                unit = None
                if isinstance(v, yaml.ScalarNode) and v.tag.endswith(":str") and v.value.strip()[-2:] in ("ms", "us"):
                    unit = v.value.strip()[-2:]  # "2.5ms": a latency budget's limit with its unit
                    v = yaml.ScalarNode("tag:yaml.org,2002:str", v.value.strip()[:-2], v.start_mark, v.end_mark)
                budgets.append(ir.Budget(metric=metric.strip(), format=fmt.strip() if fmt else None,
                                         limit=self.value(v), unit=unit, span=self.span(kn)))
        out["budgets"] = budgets
        if "precision" in fields:
            out["precision"] = self.precision(fields["precision"][1])
        out["body"] = self.elements(fields["layers"][1]) if "layers" in fields else []
        return ir.ModelDef(**out)

    def precision(self, node) -> ir.Precision | None:
        """`precision: int4-channel`, or `{default: int4-channel, fc: int8, "features.*": fp16}`."""
        if isinstance(node, yaml.ScalarNode):
            return ir.Precision(default=self.text(node, "`precision`", "int8"), span=self.span(node))
        items = self.mapping(node, "`precision`")
        rules, default = [], None
        for key, kn, v in items:
            fmt = self.text(v, f"the format of `{key}`", "int8")
            if key == "default":
                default = fmt
            else:
                rules.append(ir.PrecisionRule(pattern=key, format=fmt, span=self.span(kn)))
        if default is None:
            self.diags.error("`precision` needs a `default` format", self.span(node),
                             hint="e.g. precision: {default: int4-channel, fc: int8}")
            return None
        return ir.Precision(default=default, rules=rules, span=self.span(node))

    def shape(self, node) -> list[int] | None:
        if isinstance(node, yaml.SequenceNode):
            values = [v.value for v in node.value]
        else:
            values = str(node.value).split("x")
        try:
            shape = [int(v) for v in values]
        except (ValueError, TypeError):
            shape = None
        if not shape or any(s < 1 for s in shape):
            self.diags.error(f"invalid input shape `{node.value if isinstance(node, yaml.ScalarNode) else values}`: "
                             "every size must be at least 1", self.span(node),
                             expected="a shape such as 3x32x32 or [3, 32, 32]")
            return None
        return shape

    def spec(self, root) -> ir.SpecFile:
        top = {k: (kn, v) for k, kn, v in self.mapping(root, "a spec file")}
        for key in top.keys() - {"blocks", "model"}:
            self.diags.error(f"unknown top-level key `{key}`", self.span(top[key][0]),
                             expected="`blocks` and `model`", hint=did_you_mean(key, ["blocks", "model"]))
        blocks = []
        if "blocks" in top:
            for name, kn, v in self.mapping(top["blocks"][1], "blocks"):
                fields = {k: (kk, vv) for k, kk, vv in self.mapping(v, f"block `{name}`")}
                for key in fields.keys() - {"params", "layers"}:
                    self.diags.error(f"unknown key `{key}` in block `{name}`", self.span(fields[key][0]),
                                     expected="`params` and `layers`", hint=did_you_mean(key, ["params", "layers"]))
                blocks.append(ir.BlockDef(
                    name=name, span=self.span(kn),
                    params=self.params(fields["params"][1]) if "params" in fields else [],
                    body=self.elements(fields["layers"][1]) if "layers" in fields else []))
        models = [self.model(top["model"][1])] if "model" in top else []
        return ir.SpecFile(path=self.path, blocks=blocks, models=models)


def _kind(node) -> str:
    return {yaml.ScalarNode: "scalar", yaml.SequenceNode: "list", yaml.MappingNode: "mapping"}[type(node)]


def parse_yaml(text: str, path: str) -> tuple[ir.SpecFile, list]:
    """The IR and the problems found on the way (reported with the validator's, all at once)."""
    sources = {path: text}
    try:
        root = yaml.compose(text, Loader=NoAliasLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        span = Span(path, mark.line + 1, mark.column + 1) if mark else Span(path, 1, 1)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError([Diagnostic(f"invalid YAML: {problem}", span)], sources) from None
    except RecursionError:
        raise SpecError([Diagnostic("the YAML nests too deeply", Span(path, 1, 1),
                                    hint="flatten the spec, e.g. with blocks and `repeat`")], sources) from None
    if root is None:
        raise SpecError([Diagnostic("empty spec file", Span(path, 1, 1),
                                    expected="`model:` with `layers:`")], sources)
    diags = Diagnostics(sources)
    if not isinstance(root, yaml.MappingNode):  # nothing else to check: no model can follow
        raise SpecError([Diagnostic(f"a spec file must be a mapping, got a {_kind(root)}",
                                    _YamlConverter(path, diags).span(root), expected="`model:` with `layers:`")],
                        sources)
    try:
        spec = _YamlConverter(path, diags).spec(root)
    except RecursionError:
        raise SpecError([Diagnostic("the spec nests too deeply", Span(path, 1, 1),
                                    hint="flatten the spec, e.g. with blocks and `repeat`")], sources) from None
    return spec, diags.items
