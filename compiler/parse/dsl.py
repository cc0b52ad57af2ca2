"""DSL front end: `.spec` text -> IR, with lark (LALR, positions kept)."""
from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .. import ir
from ..errors import Diagnostic, Span, SpecError
from ..expr import LIMIT

GRAMMAR = Path(__file__).resolve().parent.parent / "grammar" / "spec.lark"

# How terminals read in "expected ..." lines.
_FRIENDLY = {
    "NAME": "a name",
    "NUMBER": "a number",
    "SHAPE": "an input shape such as 3x32x32",
    "FORMAT": "a weight format (fp32, fp16, int8)",
    "PROJECT": "`project`",
    "$END": "end of file",
}


@functools.cache
def parser() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", start=["start", "expr_only", "space_only"],
                propagate_positions=True, maybe_placeholders=True)


def _terminal_text(name: str) -> str:
    if name in _FRIENDLY:
        return _FRIENDLY[name]
    for term in parser().terminals:
        if term.name == name and term.pattern.type == "str":
            return f"`{term.pattern.value}`"
    return name


def _expected(names) -> str:
    texts = sorted({_terminal_text(n) for n in names})
    return ", ".join(texts)


def syntax_error(err: UnexpectedInput, path: str, text: str) -> SpecError:
    """Turn a lark error into a positioned diagnostic with what was expected."""
    line, column = getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1
    if isinstance(err, UnexpectedToken) and err.token.type == "$END":
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
        message = "unexpected end of file"
        expected = _expected(err.expected)
    elif isinstance(err, UnexpectedToken):
        token = err.token
        shown = str(token) if len(str(token)) < 30 else str(token)[:27] + "..."
        message = f"unexpected `{shown}`"
        expected = _expected(err.expected)
    elif isinstance(err, UnexpectedCharacters):
        message = f"unexpected character `{text[err.pos_in_stream]}`"
        expected = _expected(err.allowed) if err.allowed else None
    elif isinstance(err, UnexpectedEOF):
        message = "unexpected end of file"
        expected = _expected(err.expected)
    else:  # pragma: no cover - lark has no other kinds today
        message, expected = str(err), None
    hint = None
    if expected and "`}`" in expected and "end of file" in message:
        hint = "a `{` is not closed"
    diag = Diagnostic(message, Span(path, line, column), expected=expected, hint=hint)
    return SpecError([diag], {path: text})


# --- tree -> IR --------------------------------------------------------------

class _Converter:
    def __init__(self, path: str):
        self.path = path

    def span(self, item) -> Span | None:
        if isinstance(item, Token):
            return Span(self.path, item.line, item.column, item.end_column)
        meta = getattr(item, "meta", None)
        if meta is None or getattr(meta, "empty", True):
            return None
        end = meta.end_column if meta.end_line == meta.line else None
        return Span(self.path, meta.line, meta.column, end)

    # expressions
    def expr(self, tree) -> ir.Expr:
        span = self.span(tree)
        kind = tree.data
        if kind == "number":
            return ir.Num(value=parse_number(str(tree.children[0])), span=span)
        if kind == "true":
            return ir.Bool(value=True, span=span)
        if kind == "false":
            return ir.Bool(value=False, span=span)
        if kind == "var":
            return ir.Var(name=str(tree.children[0]), span=self.span(tree.children[0]))
        if kind == "neg":
            return ir.Neg(operand=self.expr(tree.children[0]), span=span)
        if kind == "func":
            name, *args = tree.children
            args = [self.expr(a) for a in args if a is not None]
            return ir.Func(name=str(name), args=args, span=self.span(name))
        ops = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%"}
        left, right = tree.children
        return ir.BinOp(op=ops[kind], left=self.expr(left), right=self.expr(right), span=span)

    def args(self, tree) -> list[ir.Arg]:
        if tree is None:
            return []
        out = []
        for arg in tree.children:
            if arg is None:
                continue
            name, value = arg.children
            out.append(ir.Arg(name=str(name) if name is not None else None,
                              value=self.expr(value), span=self.span(arg)))
        return out

    def elements(self, items) -> list[ir.Element]:
        return [self.element(e) for e in items if isinstance(e, Tree) and e.data == "element"]

    def element(self, tree) -> ir.Element:
        label, term, repeat = tree.children
        return ir.Element(label=str(label) if label is not None else None, term=self.term(term),
                          repeat=self.expr(repeat) if repeat is not None else None,
                          span=self.span(label if label is not None else term))

    def term(self, tree) -> ir.Term:
        kind = tree.data
        if kind == "call":
            name, args = tree.children
            return ir.Call(name=str(name), args=self.args(args), span=self.span(name))
        if kind == "group":
            return ir.Group(elements=self.elements(tree.children), span=self.span(tree))
        if kind == "residual":
            project, *rest = tree.children
            shortcut = None
            if rest and isinstance(rest[-1], Tree) and rest[-1].data == "shortcut":
                shortcut = self.elements(rest[-1].children)
                rest = rest[:-1]
            elif rest and rest[-1] is None:
                rest = rest[:-1]
            return ir.Residual(project=project is not None, body=self.elements(rest),
                               shortcut=shortcut, span=self.span(tree))
        if kind == "join":
            mode, split, *branches = tree.children
            return ir.Join(mode=str(mode), split=self.args(split.children[1]) if split is not None else None,
                           branches=[self.elements(b.children) for b in branches], span=self.span(tree))
        if kind == "gate":
            return ir.Join(mode="mul", branches=[[], self.elements(tree.children)], gate=True, span=self.span(tree))
        if kind == "tv_ref":
            name, args = tree.children
            return ir.TorchvisionRef(name=str(name), args=self.args(args), span=self.span(name))
        raise AssertionError(kind)  # grammar and converter out of step

    def params(self, tree) -> list[ir.ParamDecl]:
        if tree is None:
            return []
        out = []
        for p in tree.children:
            if p is None:
                continue
            name, type_, default, space = p.children
            out.append(ir.ParamDecl(name=str(name), type=str(type_),
                                    default=self.expr(default) if default is not None else None,
                                    space=self.space(space) if space is not None else None,
                                    span=self.span(name)))
        return out

    def space(self, tree) -> ir.ParamSpace:
        body = tree.children[0]
        if body.data == "space_list":
            return ir.ParamSpace(values=[self.expr(e) for e in body.children if e is not None],
                                 span=self.span(tree))
        start, stop, step = body.children
        return ir.ParamSpace(start=self.expr(start), stop=self.expr(stop),
                             step=self.expr(step) if step is not None else None, span=self.span(tree))

    def spec(self, tree) -> ir.SpecFile:
        blocks, models = [], []
        for d in tree.children:
            if d.data == "block_def":
                name, params, *body = d.children
                blocks.append(ir.BlockDef(name=str(name), params=self.params(params),
                                          body=self.elements(body), span=self.span(name)))
            else:
                models.append(self.model(d))
        return ir.SpecFile(path=self.path, blocks=blocks, models=models)

    def model(self, tree) -> ir.ModelDef:
        name, params, *items = tree.children
        fields: dict = {"budgets": [], "body": []}
        for item in items:
            once = {"input_stmt": "input", "width_stmt": "width_mult", "precision_stmt": "precision"}.get(item.data)
            if once in fields:  # a second one would silently replace the first
                what = {"input": "`input` line", "width_mult": "`width` line", "precision": "`precision` section"}
                raise SpecError([Diagnostic(f"a model has one {what[once]}", self.span(item),
                                            hint="keep one of them")])
            if item.data == "input_stmt":
                fields["input"] = [parse_number(v) for v in str(item.children[0]).split("x")]
            elif item.data == "budget_stmt":
                metric, fmt, limit, unit = item.children
                fields["budgets"].append(ir.Budget(
                    metric=str(metric), format=str(fmt) if fmt is not None else None,
                    limit=self.expr(limit), unit=str(unit) if unit is not None else None, span=self.span(metric)))
            elif item.data == "precision_stmt":
                default, *rules = item.children
                fields["precision"] = ir.Precision(
                    default=str(default), span=self.span(default),
                    rules=[ir.PrecisionRule(pattern=str(r.children[0])[1:-1], format=str(r.children[1]),
                                            span=self.span(r.children[0])) for r in rules if r is not None])
            elif item.data == "width_stmt":
                mult, round_to = item.children
                fields["width_mult"] = self.expr(mult)
                fields["round_to"] = self.expr(round_to) if round_to is not None else None
            else:
                fields["body"].append(self.element(item))
        return ir.ModelDef(name=str(name), params=self.params(params), span=self.span(name), **fields)


_SUFFIX = {"k": 10**3, "M": 10**6, "G": 10**9}


def parse_number(text: str) -> int | float:
    text = text.replace("_", "")
    scale = 1
    if text[-1] in _SUFFIX:
        scale, text = _SUFFIX[text[-1]], text[:-1]
    if any(c in text for c in ".eE"):
        value = float(text) * scale
        return int(value) if scale != 1 and value.is_integer() else value
    if len(text) > 30:  # past the expression limit anyway; Python refuses int() of 4,300+ digits
        return LIMIT
    return int(text) * scale


MAX_NESTING = 100  # brackets, unary minus signs in a row, or operators in one expression; deeper ones
# reach Python's recursion limit


def _check_nesting(text: str, path: str) -> None:
    """Refuse, with a position, nesting deeper than MAX_NESTING (checked before parsing)."""
    depth = minus_run = 0
    line, col, in_comment = 1, 0, False
    for ch in text:
        col += 1
        if ch == "\n":
            line, col, in_comment = line + 1, 0, False
            continue
        if in_comment or ch in " \t\r":
            continue
        if ch == "#":
            in_comment = True
            continue
        minus_run = minus_run + 1 if ch == "-" else 0
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth = max(0, depth - 1)
        if depth > MAX_NESTING or minus_run > MAX_NESTING:
            raise SpecError([Diagnostic(f"nesting deeper than {MAX_NESTING} levels", Span(path, line, col),
                                        hint="flatten the spec, e.g. with blocks and `x N` repetition")],
                            {path: text})


_OPERATORS = {"add", "sub", "mul", "div", "floordiv", "mod", "neg", "func"}


def _check_operators(tree: Tree, path: str, text: str, at: Span | None = None) -> None:
    """Refuse expressions nested deeper than MAX_NESTING operators, with a position (`at`: a YAML
    value's). A flat `1+1+...+1` nests as deep as it is long, and converting it would recurse; the
    walk here keeps its own stack."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if node.data in _OPERATORS:
            depth += 1
            if depth > MAX_NESTING:
                meta = node.meta
                span = at or Span(path, meta.line, meta.column)
                raise SpecError([Diagnostic(f"an expression nests more than {MAX_NESTING} operators", span,
                                            expected=f"at most {MAX_NESTING} operators inside one another",
                                            hint="compute the value once, e.g. as a model parameter")],
                                {path: text})
        stack.extend((child, depth) for child in node.children)


def parse_dsl(text: str, path: str) -> ir.SpecFile:
    _check_nesting(text, path)
    try:
        tree = parser().parse(text, start="start")
    except UnexpectedInput as err:
        raise syntax_error(err, path, text) from None
    _check_operators(tree, path, text)
    try:
        return _Converter(path).spec(tree)
    except SpecError as err:  # the converter knows positions, not the text to quote
        err.sources = err.sources or {path: text}
        raise


def parse_expression(text: str, span: Span | None) -> ir.Expr:
    """Parse one expression (the YAML front end's string values)."""
    path = span.file if span else "<expr>"
    try:
        tree = parser().parse(text, start="expr_only")
    except UnexpectedInput as err:
        # Report at the YAML value's position; the column inside the string is added.
        line, col = (span.line, span.column) if span else (1, 1)
        col += max((getattr(err, "column", 1) or 1) - 1, 0)
        raise SpecError([Diagnostic(f"invalid expression `{text}`", Span(path, line, col),
                                    expected="an expression such as `2*base` or `int(64*mult)`")]) from None
    _check_operators(tree, path, text, span)
    conv = _Converter(path)
    expr = conv.expr(tree.children[0])
    # Positions inside a YAML string are relative to that string: use the value's span.
    return _respan(expr, span)


def parse_space(text: str, span: Span | None) -> ir.ParamSpace:
    """Parse a parameter space, `in 8..64 step 8` or `in [3, 5]` (the YAML front end's `in:` strings)."""
    path = span.file if span else "<space>"
    try:
        tree = parser().parse(text if text.lstrip().startswith("in") else f"in {text}", start="space_only")
    except UnexpectedInput:
        line, col = (span.line, span.column) if span else (1, 1)
        raise SpecError([Diagnostic(f"invalid parameter space `{text}`", Span(path, line, col),
                                    expected="`LOW..HIGH`, `LOW..HIGH step N` or `[A, B, ...]`")]) from None
    return _respan(_Converter(path).space(tree.children[0]), span)


def _respan(expr, span):
    data = expr.model_dump()

    def fix(d):
        if isinstance(d, dict):
            return {k: (span if k == "span" else fix(v)) for k, v in d.items()}
        if isinstance(d, list):
            return [fix(v) for v in d]
        return d

    return type(expr).model_validate(fix(data))
