"""Evaluation of spec expressions (`2*width`, `int(width*mult)`, `divisible(v, 8)`)."""
from __future__ import annotations

import math

from . import ir


class ExprError(Exception):
    def __init__(self, message: str, node: ir.IRNode, hint: str | None = None):
        super().__init__(message)
        self.node, self.hint = node, hint


LIMIT = 2 ** 63  # no count in a model comes near it; past it, arithmetic only burns memory


def divisible(value: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, never dropping more than 10% (MobileNet's rule)."""
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or int(divisor) < 1:
        raise ValueError(f"the divisor must be a positive integer, got {divisor!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"the value must be a positive number, got {value!r}")
    divisor = int(divisor)
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


FUNCTIONS = {
    "int": (1, 1, lambda x: int(x)),
    "float": (1, 1, lambda x: float(x)),
    "round": (1, 1, lambda x: int(round(x))),
    "ceil": (1, 1, lambda x: math.ceil(x)),
    "floor": (1, 1, lambda x: math.floor(x)),
    "min": (1, 99, min),
    "max": (1, 99, max),
    "divisible": (1, 2, divisible),
}

_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}


def evaluate(expr: ir.Expr, env: dict[str, object]):
    """The value of an expression: a bool, an int within +-2^63 or a finite float, or ExprError."""
    value = _evaluate(expr, env)
    if isinstance(value, float) and not math.isfinite(value):
        raise ExprError(f"the result is {value}, not a finite number", expr,
                        hint="check the operands: a too large literal or a division that overflows")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= LIMIT:
        raise ExprError("the result is too large (2^63 or more)", expr)
    return value


def _evaluate(expr: ir.Expr, env: dict[str, object]):
    kind = expr.kind
    if kind in ("num", "bool"):
        return expr.value
    if kind == "var":
        if expr.name not in env:
            raise ExprError(f"unknown name `{expr.name}`", expr)
        return env[expr.name]
    if kind == "neg":
        return -evaluate(expr.operand, env)
    if kind == "binop":
        left, right = evaluate(expr.left, env), evaluate(expr.right, env)
        if isinstance(left, bool) or isinstance(right, bool):
            raise ExprError(f"cannot use `{expr.op}` on true/false", expr)
        if expr.op in ("/", "//", "%") and right == 0:
            raise ExprError("division by zero", expr)
        return _OPS[expr.op](left, right)
    if kind == "func":
        if expr.name not in FUNCTIONS:
            raise ExprError(f"unknown function `{expr.name}`", expr,
                            hint="functions: " + ", ".join(sorted(FUNCTIONS)))
        low, high, fn = FUNCTIONS[expr.name]
        if not low <= len(expr.args) <= high:
            raise ExprError(f"`{expr.name}` takes {low}{'' if low == high else f' to {high}'} argument(s), "
                            f"got {len(expr.args)}", expr)
        args = [evaluate(a, env) for a in expr.args]
        if any(isinstance(a, bool) for a in args) and expr.name != "min" and expr.name != "max":
            raise ExprError(f"`{expr.name}` takes numbers, not true/false", expr)
        try:
            return fn(*args)
        except (ValueError, OverflowError, TypeError, ZeroDivisionError) as err:
            raise ExprError(f"`{expr.name}`: {err}", expr) from None
    raise AssertionError(kind)


def free_names(expr: ir.Expr):
    """Every variable an expression reads, with its node (for static checks)."""
    if expr.kind == "var":
        yield expr
    elif expr.kind == "neg":
        yield from free_names(expr.operand)
    elif expr.kind == "binop":
        yield from free_names(expr.left)
        yield from free_names(expr.right)
    elif expr.kind == "func":
        for a in expr.args:
            yield from free_names(a)


def type_name(value) -> str:
    return {bool: "bool", int: "int", float: "float"}.get(type(value), type(value).__name__)


def coerce(value, wanted: str):
    """Check a value against a declared type; int is accepted where float is wanted.

    Returns the converted value or raises TypeError with a readable reason.
    """
    if wanted == "bool":
        if isinstance(value, bool):
            return value
    elif wanted == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif wanted == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise TypeError(f"expects {wanted}, got {value!r} ({type_name(value)})")
