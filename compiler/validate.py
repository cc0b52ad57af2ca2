"""The one validator both front ends share.

Checks what can be checked before any parameter value is known -- names of layers,
blocks, arguments, variables, types, budgets -- collecting every problem in the
file, and returns the IR with every call's arguments bound by name in signature
order (so `conv(16, 3)` and `conv: {out: 16, kernel: 3}` give the same IR).
"""
from __future__ import annotations

import re

from . import ir
from .errors import Diagnostics, Span, did_you_mean
from .expr import FUNCTIONS, LIMIT, ExprError, evaluate, free_names
from .fileformat import FORMAT_HELP, SUMMARY_FORMATS, is_format
from .latency import ALIASES as LATENCY_ALIASES
from .latency import TARGETS as LATENCY_TARGET_LIBRARIES
from .ops import LAYERS, REQUIRED
from .space import SpaceError, space_of

PARAM_TYPES = ("int", "float", "bool")
BUDGET_METRICS = ("params", "macs", "bytes", "onnx", "latency")  # onnx: the deployed ONNX file (`weights` form)
LATENCY_TARGETS = (*LATENCY_TARGET_LIBRARIES, *LATENCY_ALIASES)
FILE_METRICS = ("bytes", "onnx")
RESERVED_LABELS = ("body", "shortcut")
IN_CHANNELS = "in_channels"  # in a block: the channel count of the input it receives
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names every nn.Module has (a label is a submodule's attribute name): torch refuses or shadows them.
_MODULE_ATTRIBUTES = {"training", "forward", "parameters", "modules", "children", "state_dict", "to", "cuda", "cpu",
                      "eval", "train", "apply", "type", "float", "double", "half", "register_buffer",
                      "register_parameter", "add_module", "zero_grad", "dump_patches", "call_super_init"}


class _Validator:
    def __init__(self, spec: ir.SpecFile, diags: Diagnostics):
        self.spec, self.diags = spec, diags
        self.blocks = {b.name: b for b in spec.blocks}

    def run(self) -> ir.SpecFile:
        self.formats = SUMMARY_FORMATS + ("int8-tensor",)
        seen: set[str] = set()
        for b in self.spec.blocks:
            if not _LABEL.fullmatch(b.name):
                self.diags.error(f"block name `{b.name}` is not a name", b.span,
                                 expected="letters, digits and `_`, starting with a letter or `_`")
            if b.name in LAYERS:
                self.diags.error(f"block `{b.name}` has the name of a built-in layer", b.span,
                                 hint="rename the block")
            if b.name in seen:
                self.diags.error(f"block `{b.name}` is defined twice", b.span)
            seen.add(b.name)
        self._check_cycles()
        for b in self.spec.blocks:
            for p in b.params:
                if p.name == IN_CHANNELS:
                    self.diags.error(f"`{IN_CHANNELS}` is the channel count a block receives; it cannot be "
                                     "declared", p.span, hint="use another parameter name")
        blocks = [b.model_copy(update={"params": self.params(b.params, set()),
                                       "body": self.body(b.body, {p.name for p in b.params} | {IN_CHANNELS})})
                  for b in self.spec.blocks]
        models = []
        if not self.spec.models:
            self.diags.error("no model in this file", Span(self.spec.path, 1, 1), expected="`model NAME { ... }`")
        names: set[str] = set()
        for m in self.spec.models:
            if not _LABEL.fullmatch(m.name):
                self.diags.error(f"model name `{m.name}` is not a name", m.span,
                                 expected="letters, digits and `_`, starting with a letter or `_`")
            if m.name in names:
                self.diags.error(f"model `{m.name}` is defined twice", m.span, hint="rename one of them")
            names.add(m.name)
            if m.input is not None and any(s < 1 or s >= LIMIT for s in m.input):
                self.diags.error(f"input sizes must be at least 1 and below 2^63, got {'x'.join(map(str, m.input))}",
                                 m.span)
            scope = {p.name for p in m.params}
            if m.precision is not None:
                for where, fmt in [(m.precision, m.precision.default)] + [(r, r.format) for r in m.precision.rules]:
                    if not is_format(fmt):
                        self.diags.error(f"unknown weight format `{fmt}` in `precision`", where.span,
                                         expected=FORMAT_HELP, hint=did_you_mean(fmt, self.formats))
                seen = set()
                for r in m.precision.rules:  # one layer, two formats: one of them would be dropped silently
                    if r.pattern in seen:
                        self.diags.error(f"`precision` names `{r.pattern}` twice", r.span,
                                         hint="keep one format for it")
                    seen.add(r.pattern)
            for b in m.budgets:
                self.budget(b, scope, has_precision=m.precision is not None)
            for e in (m.width_mult, m.round_to):
                if e is not None:
                    self.expr(e, scope)
            models.append(m.model_copy(update={"params": self.params(m.params, set()),
                                               "body": self.body(m.body, scope)}))
        return self.spec.model_copy(update={"blocks": blocks, "models": models})

    # declarations
    def params(self, params: list[ir.ParamDecl], scope: set[str]) -> list[ir.ParamDecl]:
        seen = set()
        for p in params:
            if p.type not in PARAM_TYPES:
                self.diags.error(f"unknown type `{p.type}` for parameter `{p.name}`", p.span,
                                 expected=", ".join(PARAM_TYPES), hint=did_you_mean(p.type, PARAM_TYPES))
            if p.name in seen:
                self.diags.error(f"parameter `{p.name}` is declared twice", p.span)
            seen.add(p.name)
            if p.default is not None:
                self.expr(p.default, scope)
            if p.space is not None:
                self.space(p)
        return params

    def space(self, p: ir.ParamDecl) -> None:
        try:
            default = evaluate(p.default, {}) if p.default is not None else None
        except ExprError:
            default = None  # reported with the default itself
        try:
            space_of(p, default)
        except SpaceError as err:
            self.diags.error(str(err), err.span or p.span,
                             hint="e.g. `base: int = 16 in 8..64 step 8` or `kernel: int = 3 in [3, 5]`")

    def budget(self, b: ir.Budget, scope: set[str], has_precision: bool = False) -> None:
        if b.metric not in BUDGET_METRICS:
            self.diags.error(f"unknown budget `{b.metric}`", b.span, expected=", ".join(BUDGET_METRICS),
                             hint=did_you_mean(b.metric, BUDGET_METRICS))
        elif b.metric in FILE_METRICS and b.format == "spec" and not has_precision:
            self.diags.error(f"`{b.metric}(spec)` needs a `precision` section in the model", b.span,
                             hint="add e.g. `precision int4-channel { \"fc\": int8 }`, or name a format")
        elif b.metric in FILE_METRICS and b.format != "spec" and not (b.format and is_format(b.format)):
            what = (f"unknown weight format `{b.format}`" if b.format
                    else f"an `{b.metric}` budget needs the model file's weight format" if b.metric == "onnx"
                    else f"a `{b.metric}` budget needs the model file's weight format")
            self.diags.error(what, b.span, expected=f"{b.metric}(FORMAT) with FORMAT one of {FORMAT_HELP}",
                             hint=did_you_mean(b.format or "", self.formats))
        elif b.metric == "latency" and b.format not in LATENCY_TARGETS:
            what = f"unknown latency target `{b.format}`" if b.format else "a `latency` budget needs a target"
            self.diags.error(what, b.span, expected=f"latency(TARGET), TARGET one of {', '.join(LATENCY_TARGETS)}",
                             hint=did_you_mean(b.format or "", LATENCY_TARGETS) or "e.g. latency(ort-fp32) <= 2ms")
        elif b.metric not in FILE_METRICS and b.metric != "latency" and b.format is not None:
            self.diags.error(f"`{b.metric}` takes no weight format", b.span, hint=f"write `budget {b.metric} <= ...`")
        if b.unit is not None and b.metric != "latency":
            self.diags.error(f"`{b.metric}` is not a time: its limit takes no `{b.unit}`", b.span,
                             hint="only `latency(TARGET)` budgets have a time unit")
        self.expr(b.limit, scope)

    def expr(self, e: ir.Expr, scope: set[str]) -> None:
        for var in free_names(e):
            if var.name not in scope:
                self.diags.error(f"unknown name `{var.name}`", var.span,
                                 expected="a parameter of the enclosing model or block",
                                 hint=did_you_mean(var.name, scope))
        self._funcs(e)

    def _funcs(self, e) -> None:
        if e.kind == "func":
            if e.name not in FUNCTIONS:
                self.diags.error(f"unknown function `{e.name}`", e.span, expected=", ".join(sorted(FUNCTIONS)),
                                 hint=did_you_mean(e.name, FUNCTIONS))
            for a in e.args:
                self._funcs(a)
        elif e.kind == "binop":
            self._funcs(e.left)
            self._funcs(e.right)
        elif e.kind == "neg":
            self._funcs(e.operand)

    # bodies
    def body(self, elements: list[ir.Element], scope: set[str]) -> list[ir.Element]:
        labels: set[str] = set()
        out = []
        for el in elements:
            if el.label is not None:
                if el.label in labels:
                    self.diags.error(f"label `{el.label}` is used twice in the same body", el.span)
                if el.label in RESERVED_LABELS:
                    self.diags.error(f"`{el.label}` is reserved for residual parts", el.span, hint="use another label")
                elif not _LABEL.fullmatch(el.label) or el.label.isdigit():
                    self.diags.error(f"label `{el.label}` is not a name: it becomes part of a module path",
                                     el.span, expected="letters, digits and `_`, starting with a letter or `_`")
                elif el.label in _MODULE_ATTRIBUTES:
                    self.diags.error(f"label `{el.label}` is an attribute of every torch module", el.span,
                                     hint="use another label")
                labels.add(el.label)
            if el.repeat is not None:
                self.expr(el.repeat, scope)
            out.append(el.model_copy(update={"term": self.term(el.term, scope)}))
        return out

    def term(self, t, scope: set[str]):
        if t.kind == "group":
            return t.model_copy(update={"elements": self.body(t.elements, scope)})
        if t.kind == "residual":
            shortcut = self.body(t.shortcut, scope) if t.shortcut is not None else None
            if t.project and shortcut is not None:
                self.diags.error("a residual has either `project` or an explicit `shortcut`, not both", t.span)
            return t.model_copy(update={"body": self.body(t.body, scope), "shortcut": shortcut})
        if t.kind == "join":
            if t.split is not None:
                for a in t.split:
                    if a.name is not None:
                        self.diags.error("split takes channel counts, not named arguments", a.span,
                                         hint="write e.g. `concat split(24, 40) { ... } { ... }`")
                    self.expr(a.value, scope)
                if t.split and len(t.split) != len(t.branches):
                    self.diags.error(f"split gives {len(t.split)} channel count(s) for {len(t.branches)} branches",
                                     t.span, expected="one channel count per branch, or `split` alone for equal shares")
            return t.model_copy(update={"branches": [self.body(b, scope) for b in t.branches]})
        if t.kind == "torchvision":
            for a in t.args:
                if a.name is None:
                    self.diags.error(f"arguments of torchvision `{t.name}` must be named", a.span,
                                     hint=f"write e.g. `torchvision {t.name}(num_classes=classes)`")
                self.expr(a.value, scope)
            return t
        return self.call(t, scope)

    def call(self, c: ir.Call, scope: set[str]) -> ir.Call:
        for a in c.args:
            self.expr(a.value, scope)
        if c.name in self.blocks:
            signature = [(p.name, p.default is None) for p in self.blocks[c.name].params]
            what = f"block `{c.name}`"
        elif c.name in LAYERS:
            signature = [(a.name, a.default is REQUIRED) for a in LAYERS[c.name].args]
            what = f"`{c.name}`"
        else:
            known = list(LAYERS) + list(self.blocks)
            self.diags.error(f"unknown layer or block `{c.name}`", c.span,
                             expected="a built-in layer or a block defined in this file",
                             hint=did_you_mean(c.name, known) or "layers: " + ", ".join(LAYERS))
            return c
        names = [n for n, _ in signature]
        bound: dict[str, ir.Arg] = {}
        for i, a in enumerate(c.args):
            if a.name is None:
                if i >= len(names):
                    self.diags.error(f"{what} takes at most {len(names)} positional argument(s)", a.span,
                                     expected=f"arguments {', '.join(names) or '(none)'}")
                    continue
                name = names[i]
                if any(b.name is not None for b in c.args[:i]):
                    self.diags.error("a positional argument cannot follow a named one", a.span)
            else:
                name = a.name
                if name not in names:
                    self.diags.error(f"{what} has no argument `{name}`", a.span,
                                     expected=", ".join(names) or "no arguments", hint=did_you_mean(name, names))
                    continue
            if name in bound:
                self.diags.error(f"argument `{name}` of {what} is given twice", a.span)
            bound[name] = a.model_copy(update={"name": name})
        for name, required in signature:
            if required and name not in bound:
                self.diags.error(f"{what} needs argument `{name}`", c.span,
                                 hint=f"e.g. `{c.name}({name}=...)`")
        ordered = [bound[n] for n in names if n in bound]
        return c.model_copy(update={"args": ordered})

    def _check_cycles(self) -> None:
        state: dict[str, int] = {}

        def calls(elements):
            for el in elements:
                t = el.term
                if t.kind == "call" and t.name in self.blocks:
                    yield t
                elif t.kind == "group":
                    yield from calls(t.elements)
                elif t.kind == "residual":
                    yield from calls(t.body)
                    yield from calls(t.shortcut or [])
                elif t.kind == "join":
                    for branch in t.branches:
                        yield from calls(branch)

        def visit(name):
            state[name] = 1
            for c in calls(self.blocks[name].body):
                if state.get(c.name) == 1:
                    self.diags.error(f"block `{c.name}` calls itself (through `{name}`)", c.span,
                                     hint="blocks cannot be recursive")
                elif c.name not in state:
                    visit(c.name)
            state[name] = 2

        for name in self.blocks:
            if name not in state:
                visit(name)


def validate(spec: ir.SpecFile, sources: dict[str, str] | None = None, pending=()) -> ir.SpecFile:
    """Validate and bind; raises SpecError with `pending` and every problem found here."""
    diags = Diagnostics(sources)
    diags.items.extend(pending)
    out = _Validator(spec, diags).run()
    diags.raise_if_any()
    return out
