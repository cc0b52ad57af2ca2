"""The spec IR: what both front ends (DSL and YAML) produce.

Pydantic models, immutable once built; every node keeps its source span so later
passes can point at the file, line and column. Expressions stay symbolic here;
`elaborate` evaluates them for concrete parameter values.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import Span


class IRNode(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    span: Span | None = Field(default=None, repr=False)


# --- expressions -----------------------------------------------------------

class Num(IRNode):
    kind: Literal["num"] = "num"
    value: int | float


class Bool(IRNode):
    kind: Literal["bool"] = "bool"
    value: bool


class Var(IRNode):
    kind: Literal["var"] = "var"
    name: str


class BinOp(IRNode):
    kind: Literal["binop"] = "binop"
    op: Literal["+", "-", "*", "/", "//", "%"]
    left: "Expr"
    right: "Expr"


class Neg(IRNode):
    kind: Literal["neg"] = "neg"
    operand: "Expr"


class Func(IRNode):
    kind: Literal["func"] = "func"
    name: str
    args: list["Expr"]


Expr = Annotated[Union[Num, Bool, Var, BinOp, Neg, Func], Field(discriminator="kind")]


# --- architecture ----------------------------------------------------------

class Arg(IRNode):
    """A call argument. After validation every argument has a name."""

    name: str | None = None
    value: Expr


class Call(IRNode):
    """A layer (`conv(16)`) or a block call (`dws(32)`)."""

    kind: Literal["call"] = "call"
    name: str
    args: list[Arg] = []


class Group(IRNode):
    kind: Literal["group"] = "group"
    elements: list["Element"] = []


class Residual(IRNode):
    """`residual [project] { body } [shortcut { ... }]`: output = body(x) + shortcut(x).

    Without `project` or an explicit shortcut the shortcut is the identity and
    shapes must match; with `project` a 1x1 conv + BN is inserted when they differ.
    """

    kind: Literal["residual"] = "residual"
    project: bool = False
    body: list["Element"]
    shortcut: list["Element"] | None = None


class TorchvisionRef(IRNode):
    """`torchvision resnet18(num_classes=classes)`: a torchvision model as a layer."""

    kind: Literal["torchvision"] = "torchvision"
    name: str
    args: list[Arg] = []


class Join(IRNode):
    """`concat|add|mul [split[(sizes)]] { ... } { ... } ...`: parallel branches, joined.

    `split` None: every branch receives the whole input; [] equal shares of its channels; else one
    channel count per branch. An empty branch is the identity. `gate { body }` is `mul { } { body }`.
    """

    kind: Literal["join"] = "join"
    mode: Literal["concat", "add", "mul"]
    split: list[Arg] | None = None
    branches: list[list["Element"]]
    gate: bool = False  # written as `gate { body }` (emitted back that way)


Term = Annotated[Union[Call, Group, Residual, TorchvisionRef, Join], Field(discriminator="kind")]


class Element(IRNode):
    """One item of a body: an optional label, a term, an optional repetition."""

    label: str | None = None
    term: Term
    repeat: Expr | None = None


class ParamSpace(IRNode):
    """A model parameter's candidate values: `in [3, 5]` (values) or `in 8..64 step 8` (start, stop inclusive)."""

    values: list[Expr] | None = None
    start: Expr | None = None
    stop: Expr | None = None
    step: Expr | None = None


class ParamDecl(IRNode):
    name: str
    type: str  # int | float | bool, checked by the validator
    default: Expr | None = None
    space: ParamSpace | None = None  # candidate values (search spaces); the default is one of them


class Budget(IRNode):
    metric: str          # params | macs | bytes (the model file) | onnx (the deployed ONNX file) | latency
    format: str | None = None  # bytes, onnx: the model file's weight format (fp32 | int8 | spec | ...);
    # latency: the target (ort-fp32 | torch-fp32 | ort-weights)
    limit: Expr
    unit: str | None = None  # latency: ms | us (None: ms)

    @property
    def scale(self) -> float:
        """What the limit's number is multiplied by to give the metric's own unit (latency: ms)."""
        return 0.001 if self.unit == "us" else 1.0

    @property
    def title(self) -> str:
        return f"{self.metric}({self.format})" if self.format else self.metric


class BlockDef(IRNode):
    name: str
    params: list[ParamDecl] = []
    body: list[Element] = []


class PrecisionRule(IRNode):
    pattern: str              # fnmatch pattern of layer paths ("fc", "features.*")
    format: str


class Precision(IRNode):
    """`precision int4-channel { "fc": int8 }`: the weight format of each layer's tensors (`bytes(spec)`)."""

    default: str
    rules: list[PrecisionRule] = []


class ModelDef(IRNode):
    name: str
    params: list[ParamDecl] = []
    input: list[int] | None = None
    width_mult: Expr | None = None
    round_to: Expr | None = None
    budgets: list[Budget] = []
    precision: Precision | None = None
    body: list[Element] = []


class SpecFile(IRNode):
    path: str
    blocks: list[BlockDef] = []
    models: list[ModelDef] = []


for _model in (BinOp, Neg, Func, Group, Residual, Join, Element):
    _model.model_rebuild()


def without_spans(data):
    """A dump of an IR node with every span removed (to compare front ends)."""
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if isinstance(data, dict):
        return {k: without_spans(v) for k, v in data.items() if k != "span"}
    if isinstance(data, list):
        return [without_spans(v) for v in data]
    return data
