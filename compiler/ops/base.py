"""What every op record is made of: argument signatures, state-dict tensors, errors (no torch)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

REQUIRED = object()

# How an op's channels take part in structured pruning (compiler.rewrite.channels):
PRODUCES = "produces"    # makes a new channel space (its outputs can be pruned): conv, linear
WEIGHTED = "weighted"    # carries per-channel weights through its input space: bn, depthwise conv
PASSES = "passes"        # passes channels through untouched: activations, pools, flatten, ...
BLOCKS = "blocks"        # ties its channels so they cannot be pruned: grouped conv, torchvision
ROLES = (PRODUCES, WEIGHTED, PASSES, BLOCKS)


class LayerError(Exception):
    """A layer cannot take this input or these arguments (turned into a diagnostic)."""

    def __init__(self, message: str, *, arg: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.arg, self.hint = arg, hint


@dataclass(frozen=True)
class ArgSpec:
    name: str
    type: str  # int | float | bool
    default: object = REQUIRED


@dataclass(frozen=True)
class Tensor:
    """One state-dict entry: local name, shape, dtype (safetensors dtype names)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"
    is_param: bool = True  # parameters vs buffers (BN running statistics)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _no_tensors(attrs: dict) -> list[Tensor]:
    return []


def _no_macs(attrs: dict, out_shape: tuple) -> int:
    return 0


def _no_scale(attrs: dict) -> str | None:
    return None


# What a factorizable op splits into at a rank: two layers of the language with their arguments.
Factor = Callable[[dict, int], tuple[tuple[str, dict], tuple[str, dict]]]


@dataclass(frozen=True)
class OpRecord:
    """Everything torch-free about one op (what a layer resolves to): its state-dict tensors, its
    multiply-accumulates, how a node of it is written back as DSL, its pruning role, and the traits
    that building, BatchNorm folding, low-rank factorization and pruning importance read."""

    name: str
    emit: Callable                                    # (node, arg) -> DSL text; arg(name) -> symbol or number
    role: Callable[[dict], str]                       # attrs -> one of ROLES
    tensors: Callable[[dict], list[Tensor]] = _no_tensors
    macs: Callable[[dict, tuple], int] = _no_macs    # per sample; torch.utils.flop_counter's convention
    rechannel: Callable | None = None                 # (attrs, in_channels, out_channels): pruning's new counts
    out_shape: Callable | None = None                 # (attrs, in_shape, old_out) -> shape; default: channels first
    fresh: bool = False           # returns a new tensor its backward does not keep: a later activation runs in place
    folds_bn: bool = False        # a BatchNorm right after it folds into its [out, ...] weight and a bias
    factor: Factor | None = None  # (attrs, rank) -> the two layers it factorizes into (low-rank)
    factorizable: Callable[[dict], bool] = lambda attrs: True  # with `factor`: whether these attrs can
    channel_scale: Callable[[dict], str | None] = _no_scale    # a per-channel scale tensor that ranks
    # channels for pruning (BatchNorm's gamma, network slimming), or None
    onnx: Callable | None = None  # (writer, attrs, input name) -> output name: its ONNX nodes
    # (compiler.onnxgraph.GraphWriter); None: the op cannot be deployed as ONNX

    def reshaped(self, attrs: dict, in_shape: tuple, old_out: tuple) -> tuple:
        """The output shape after the input's channels (or `out`) changed."""
        if self.out_shape is not None:
            return self.out_shape(attrs, in_shape, old_out)
        return (attrs.get("out", in_shape[0]), *old_out[1:])


@dataclass(frozen=True)
class LayerKind:
    """A layer of the language: its arguments and the op it resolves to for an input shape."""

    name: str
    op: str
    args: tuple[ArgSpec, ...]
    resolve: Callable[[tuple, dict], tuple[str, dict, tuple]]  # -> (op, attrs, out_shape)
    scalable: bool = False  # follows the model-wide width multiplier (its `out`)
    # checks of the arguments alone (no input shape): they run even downstream of another error
    check: Callable[[dict], None] = lambda args: None


def role(value: str) -> Callable[[dict], str]:
    return lambda attrs: value


def fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def image(name: str, shape: tuple) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise LayerError(f"{name} expects an image-shaped input CxHxW, got {fmt_shape(shape)}",
                         hint="convolutions and pools come before `gap`/`flatten`")
    return shape


def conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def positive(args: dict, *names: str) -> None:
    for n in names:
        if args[n] is not None and args[n] < 1:
            raise LayerError(f"`{n}` must be at least 1, got {args[n]}", arg=n)


def boolean(v: bool) -> str:
    return "true" if v else "false"


def number(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)
