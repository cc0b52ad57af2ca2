"""Elaboration: validated IR + parameter values + input shape -> a tree of concrete layers.

Every expression is evaluated, blocks and repetitions are expanded, input channels
are inferred from the previous layer, the width multiplier is applied, residual
shortcuts are checked or projected, and each layer gets its output shape and exact
counts. The tree is what both the analysis (no torch) and the builder (torch) read.
"""
from __future__ import annotations

import math

from . import ir
from .errors import Diagnostics, Span, UsageError, did_you_mean
from .expr import ExprError, coerce, divisible, evaluate, free_names
from .limits import limit
from .ops import LAYERS, REQUIRED, LayerError, fmt_shape
from .params import resolve_params
from .tree import Model, Node, layer_node, op_node
from .validate import IN_CHANNELS


class _Stop(Exception):
    """This element cannot be elaborated past an error (already recorded).

    The enclosing body goes on with an unknown shape (None), so later elements still have their
    arguments checked and every independent error in a file is reported at once; checks that need a
    shape are skipped downstream of an error, where they would only repeat it.
    """


class _Abort(Exception):
    """Elaboration cannot usefully go on (a size limit was reached, or too many errors): report now."""


MAX_ERRORS = 50


class _Elaborator:
    def __init__(self, spec: ir.SpecFile, model: ir.ModelDef, diags: Diagnostics):
        self.spec, self.model, self.diags = spec, model, diags
        self.blocks = {b.name: b for b in spec.blocks}
        self.width_mult: float | None = None
        self.round_to = 1
        # id(env) -> {name in that env: model parameter it stands for}: which layer arguments were
        # written as a model parameter, directly or through block parameters (for emit)
        self.symbols: dict[int, dict[str, str]] = {}
        self.max_repeat, self.max_layers, self.layers = limit("repeat"), limit("layers"), 0

    # helpers
    def eval(self, expr: ir.Expr, env: dict):
        if IN_CHANNELS in env and env[IN_CHANNELS] is None and any(v.name == IN_CHANNELS for v in free_names(expr)):
            raise _Stop  # downstream of an error the channels are unknown: nothing to report here
        try:
            return evaluate(expr, env)
        except ExprError as err:
            self.fail(str(err), err.node.span or expr.span, hint=err.hint)

    def fail(self, message: str, span: Span | None, *, fatal: bool = False, **kw):
        self.diags.error(message, span, **kw)
        if fatal or len(self.diags.items) >= MAX_ERRORS:
            raise _Abort
        raise _Stop

    # bodies
    def body(self, elements: list[ir.Element], shape: tuple, env: dict, path: str) -> list[Node]:
        nodes = []
        for index, el in enumerate(elements):
            name = el.label if el.label is not None else str(index)
            child_path = f"{path}.{name}" if path else name
            try:
                node = self.element(el, shape, env, name, child_path)
            except _Stop:
                node = Node(name, child_path, "error", "error", shape, None, span=el.span)
            nodes.append(node)
            shape = node.out_shape
        return nodes

    def element(self, el: ir.Element, shape, env: dict, name: str, path: str) -> Node:
        if el.repeat is None:
            return self.term(el.term, shape, env, name, path)
        count = self.eval(el.repeat, env)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            self.fail(f"repetition count must be a positive int, got {count!r}", el.repeat.span or el.span)
        if count > self.max_repeat:
            self.fail(f"repetition count {count:,} is over the limit of {self.max_repeat:,}",
                      el.repeat.span or el.span, hint="raise it with NCCOMPILE_LIMIT_REPEAT=N", fatal=True)
        copies = []
        inner = shape
        for i in range(count):  # a copy's error stops the rest: they would repeat it
            copy = self.term(el.term, inner, env, str(i), f"{path}.{i}")
            copies.append(copy)
            inner = copy.out_shape
        return Node(name, path, "repeat", "seq", shape, inner, children=copies, span=el.span, attrs={"count": count})

    def container(self, name, path, kind, shape, children, span, attrs=None) -> Node:
        out = children[-1].out_shape if children else shape
        return Node(name, path, kind, "seq", shape, out, attrs=attrs or {}, children=children, span=span)

    def term(self, t, shape, env, name, path) -> Node:
        if t.kind == "group":
            return self.container(name, path, "group", shape, self.body(t.elements, shape, env, path), t.span)
        if t.kind == "residual":
            return self.residual(t, shape, env, name, path)
        if t.kind == "torchvision":
            return self.torchvision(t, shape, env, name, path)
        if t.kind == "join":
            return self.join(t, shape, env, name, path)
        if t.name in self.blocks:
            return self.block_call(t, shape, env, name, path)
        return self.layer(t, shape, env, name, path)

    def provenance(self, call: ir.Call, env) -> dict[str, str]:
        """Arguments written as a bare name that stands for a model parameter."""
        known = self.symbols.get(id(env), {})
        return {a.name: known[a.value.name] for a in call.args
                if isinstance(a.value, ir.Var) and a.value.name in known}

    def bind(self, call: ir.Call, signature, env) -> dict:
        """Evaluate a call's (already name-bound) arguments and check their types."""
        given = {a.name: a for a in call.args}
        values = {}
        for name, type_, default in signature:
            if name in given:
                value = self.eval(given[name].value, env)
                span = given[name].span
                try:
                    value = coerce(value, type_)
                except TypeError as err:
                    hint = "wrap it in int(...), round(...) or divisible(...)" if type_ == "int" else None
                    self.fail(f"argument `{name}` of `{call.name}` {err}", span, hint=hint)
                values[name] = value
            else:
                values[name] = default
        return values

    def layer(self, call: ir.Call, shape, env, name, path) -> Node:
        self.layers += 1
        if self.layers > self.max_layers:
            self.fail(f"the model has more than {self.max_layers:,} layers", call.span,
                      hint="raise the limit with NCCOMPILE_LIMIT_LAYERS=N", fatal=True)
        kind = LAYERS[call.name]
        values = self.bind(call, [(a.name, a.type, a.default) for a in kind.args], env)
        try:
            kind.check(values)  # as written, before the width multiplier
            if kind.scalable and self.width_mult is not None and values.get("scale", True):
                values["out"] = divisible(values["out"] * self.width_mult, self.round_to)
            values.pop("scale", None)
            if shape is None:  # downstream of an error: the arguments are checked, the shapes cannot be
                return Node(name, path, call.name, "error", None, None, span=call.span)
            op, attrs, out_shape = kind.resolve(shape, values)
        except LayerError as err:
            span = next((a.span for a in call.args if a.name == err.arg), None) if err.arg else None
            self.fail(str(err), span or call.span, hint=err.hint)
        return op_node(name, path, call.name, op, shape, out_shape, attrs, call.span, self.provenance(call, env))

    def block_call(self, call: ir.Call, shape, env, name, path) -> Node:
        block = self.blocks[call.name]
        signature = []
        for p in block.params:
            default = REQUIRED if p.default is None else self.eval(p.default, {})
            signature.append((p.name, p.type, default))
        values = self.bind(call, signature, env)
        self.symbols[id(values)] = self.provenance(call, env)
        values[IN_CHANNELS] = shape[0] if shape is not None else None  # unknown downstream of an error
        children = self.body(block.body, shape, values, path)
        return self.container(name, path, call.name, shape, children, call.span)

    def residual(self, t: ir.Residual, shape, env, name, path) -> Node:
        body = self.container("body", f"{path}.body", "seq", shape, self.body(t.body, shape, env, f"{path}.body"),
                              t.span)
        children = [body]
        if shape is None or body.out_shape is None:
            if t.shortcut is not None:
                self.body(t.shortcut, shape, env, f"{path}.shortcut")
            return Node(name, path, "residual", "error", shape, None, children=children, span=t.span)
        if t.shortcut is not None:
            short = self.container("shortcut", f"{path}.shortcut", "seq", shape,
                                   self.body(t.shortcut, shape, env, f"{path}.shortcut"), t.span)
            children.append(short)
            other, what = short.out_shape, "the explicit shortcut's"
        elif t.project and body.out_shape != shape:
            children.append(self.projection(shape, body.out_shape, f"{path}.shortcut", t.span))
            other, what = shape, None
        else:
            other, what = shape, "the identity shortcut's"
        if what and other is not None and body.out_shape != other:
            hint = ("add `project` (`residual project { ... }`) for a 1x1 conv + BN shortcut, or write "
                    "`shortcut { ... }`") if t.shortcut is None else "make both branches end in the same shape"
            self.fail(f"residual: the body's output {fmt_shape(body.out_shape)} does not match "
                      f"{what} {fmt_shape(other)}", t.span, hint=hint)
        return Node(name, path, "residual", "residual", shape, body.out_shape, children=children, span=t.span)

    def join(self, t: ir.Join, shape, env, name, path) -> Node:
        layer = "gate" if t.gate else t.mode
        n = len(t.branches)
        sizes = None
        if t.split is not None:
            sizes = self.split_sizes(t, shape, env)
        inputs = [shape if shape is None or sizes is None else (s, *shape[1:]) for s in sizes or [None] * n]
        children = [self.container(str(i), f"{path}.{i}", "branch", inp, self.body(b, inp, env, f"{path}.{i}"),
                                   t.span) for i, (b, inp) in enumerate(zip(t.branches, inputs))]
        attrs = {"mode": t.mode, "split": sizes, "gate": t.gate}
        outs = [c.out_shape for c in children]
        out = None if shape is None or None in outs else self.joined(layer, outs, t.span)
        return Node(name, path, layer, "join", shape, out, attrs=attrs, children=children, span=t.span)

    def split_sizes(self, t: ir.Join, shape, env) -> list[int] | None:
        n = len(t.branches)
        sizes = []
        for a in t.split:
            s = self.eval(a.value, env)
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                self.fail(f"a split size must be a positive int, got {s!r}", a.span)
            sizes.append(s)
        if shape is None:
            return None
        c = shape[0]
        if sizes and sum(sizes) != c:
            self.fail(f"split({', '.join(map(str, sizes))}) gives {sum(sizes)} channels but the input has {c}",
                      t.span, hint="the sizes must add up to the input's channels")
        if not sizes:
            if c % n:
                self.fail(f"split: {c} input channels do not divide into {n} equal shares", t.span,
                          hint="give the sizes, e.g. `split(24, 40)`")
            sizes = [c // n] * n
        return sizes

    def joined(self, layer: str, outs: list[tuple], span) -> tuple:
        """The output shape of a join of branch outputs `outs`, or an error naming the shapes."""
        def clash(i: int, why: str):
            self.fail(f"{layer}: branch 0 gives {fmt_shape(outs[0])} but branch {i} gives {fmt_shape(outs[i])}; "
                      f"{why}", span)

        if layer == "concat":
            for i, o in enumerate(outs):
                if len(o) != len(outs[0]) or o[1:] != outs[0][1:]:
                    clash(i, "concatenation needs the same size except in channels")
            return (sum(o[0] for o in outs), *outs[0][1:])
        if layer == "add":
            for i, o in enumerate(outs):
                if o != outs[0]:
                    clash(i, "addition needs the same shapes")
            return outs[0]
        full = max(outs, key=lambda o: math.prod(o))  # mul, gate: a Cx1x1 branch scales every position
        for i, o in enumerate(outs):
            if o != full and not (len(o) == len(full) == 3 and o[0] == full[0] and o[1:] == (1, 1)):
                clash(i, "multiplication needs the same shapes, or Cx1x1 with the same channels (a gate)")
        return full

    def projection(self, shape, out_shape, path, span) -> Node:
        # A 1x1 conv with stride s maps a size n to (n - 1) // s + 1 (as the body's strided convs do).
        # the smallest s with (n - 1) // s + 1 == m for every side: s lies in ((n-1)/m, (n-1)/(m-1)]
        strides = []
        if len(shape) == 3 == len(out_shape) and all(m >= 1 for m in out_shape[1:]):
            low = max((n - 1) // m + 1 for n, m in zip(shape[1:], out_shape[1:]))
            strides = [low] if all((n - 1) // low + 1 == m for n, m in zip(shape[1:], out_shape[1:])) else []
        if not strides:
            self.fail(f"residual: cannot project {fmt_shape(shape)} onto {fmt_shape(out_shape)} "
                      "with a strided 1x1 conv",
                      span, hint="write the shortcut explicitly with `shortcut { ... }`")
        conv = layer_node("0", f"{path}.0", "conv", shape, span, out=out_shape[0], kernel=1, stride=strides[0],
                          padding=0, bias=False)
        bn = layer_node("1", f"{path}.1", "bn", conv.out_shape, span)
        return Node("shortcut", path, "projection", "seq", shape, out_shape, children=[conv, bn], span=span)

    def torchvision(self, t: ir.TorchvisionRef, shape, env, name, path) -> Node:
        from .torchvision_ref import resolve_torchvision  # imports torch: only specs that use it pay

        kwargs = {a.name: self.eval(a.value, env) for a in t.args}
        if shape is None:
            return Node(name, path, "torchvision", "error", None, None, span=t.span)
        try:
            return resolve_torchvision(t.name, kwargs, shape, name, path, t.span)
        except LayerError as err:
            self.fail(str(err), t.span, hint=err.hint)

    def scaling(self, params: dict) -> None:
        m = self.model
        mult = self.eval(m.width_mult, params)
        round_to = self.eval(m.round_to, params) if m.round_to is not None else 1
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0:
            self.fail(f"width_mult must be a positive number, got {mult!r}", m.width_mult.span)
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            self.fail(f"round_to must be a positive integer, got {round_to!r}", m.round_to.span)
        self.width_mult, self.round_to = float(mult), round_to

    def run(self, params: dict, input_shape: tuple) -> Node:
        m = self.model
        for b in m.budgets:  # limits go through the diagnostics like every other expression
            try:
                limit = self.eval(b.limit, params)
                if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
                    self.fail(f"a budget limit must be a non-negative number, got {limit!r}", b.limit.span or b.span)
            except _Stop:
                pass
        if m.width_mult is not None:
            try:
                self.scaling(params)
            except _Stop:
                pass
        only = m.body[0] if len(m.body) == 1 else None
        if only is not None and only.term.kind == "torchvision" and only.label is None and only.repeat is None:
            # A model that is just a torchvision network *is* that network: its
            # state-dict names stay torchvision's own (conv1.weight, fc.bias, ...).
            return self.torchvision(only.term, input_shape, params, "", "")
        self.symbols[id(params)] = {name: name for name in params}
        children = self.body(m.body, input_shape, params, "")
        root = self.container("", "", m.name, input_shape, children, m.span)
        if m.precision is not None:
            self.check_precision(m.precision, root)
        return root

    def check_precision(self, precision: ir.Precision, root: Node) -> None:
        """Each pattern must name at least one layer with weights (a typo would silently do nothing)."""
        from fnmatch import fnmatchcase

        paths = [n.path for n in root.walk() if n.tensors]
        for r in precision.rules:
            if not any(fnmatchcase(p, r.pattern) or fnmatchcase(p, f"{r.pattern}.*") for p in paths):
                self.diags.error(f"precision pattern `{r.pattern}` matches no layer with weights", r.span,
                                 expected=f"a layer path such as `{paths[-1] if paths else 'fc'}` or a pattern "
                                          "such as `features.*`",
                                 hint=did_you_mean(r.pattern, paths))


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"invalid input shape `{text}`: expected e.g. 3x224x224") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"invalid input shape `{text}`: every size must be at least 1")
    return shape


def select_model(spec: ir.SpecFile, model: str | None) -> ir.ModelDef:
    """The only model of the spec, or the one named."""
    if model is None:
        if len(spec.models) > 1:
            names = ", ".join(m.name for m in spec.models)
            raise UsageError(f"{spec.path} defines several models ({names}); choose one with --model")
        return spec.models[0]
    found = [m for m in spec.models if m.name == model]
    if not found:
        names = [m.name for m in spec.models]
        hint = did_you_mean(model, names) or ""
        raise UsageError(f"{spec.path} has no model `{model}` (it defines {', '.join(names)})"
                         + (f"; {hint}" if hint else ""))
    return found[0]


def elaborate(spec: ir.SpecFile, *, model: str | None = None, params: dict[str, object] | None = None,
              input_shape: tuple | None = None, sources: dict[str, str] | None = None) -> Model:
    """Elaborate one model of a validated spec (the only one, or the one named) with typed parameters."""
    definition = select_model(spec, model)
    diags = Diagnostics(sources)
    values = resolve_params(definition, params or {}, diags)
    shape = tuple(input_shape) if input_shape else (tuple(definition.input) if definition.input else None)
    if shape is None:
        diags.error(f"model `{definition.name}` has no input shape", definition.span,
                    expected="`input CxHxW` in the model, e.g. `input 3x224x224`",
                    hint="add an `input` line or pass --input 3x224x224")
    diags.raise_if_any()
    elaborator = _Elaborator(spec, definition, diags)
    try:
        root = elaborator.run(values, shape)
    except (_Stop, _Abort):
        pass
    diags.raise_if_any()
    return Model(definition.name, root, shape, values, definition, spec)


__all__ = ["Node", "Model", "elaborate", "parse_shape"]
