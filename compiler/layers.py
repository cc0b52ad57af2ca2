"""The layer catalogue: signatures, shape rules and exact counts, without torch.

Each layer kind maps bound argument values and an input shape to
  * `attrs`: the concrete constructor arguments of the torch module it builds to,
  * the output shape,
and from those the parameters, buffers, MACs and state-dict tensors are exact
functions of `op` and `attrs` (see `counts`). Shapes exclude the batch dimension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

REQUIRED = object()


class LayerError(Exception):
    """A layer cannot take this input or these arguments (turned into a diagnostic)."""

    def __init__(self, message: str, *, arg: str | None = None, hint: str | None = None,
                 expected: str | None = None):
        super().__init__(message)
        self.arg, self.hint, self.expected = arg, hint, expected


@dataclass(frozen=True)
class ArgSpec:
    name: str
    type: str  # int | float | bool
    default: object = REQUIRED


@dataclass(frozen=True)
class LayerKind:
    name: str
    args: tuple[ArgSpec, ...]
    resolve: Callable[[tuple, dict], tuple[str, dict, tuple]]  # -> (op, attrs, out_shape)
    doc: str
    scalable: bool = False  # follows the model-wide width multiplier (its `out`)
    arg_names: tuple = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "arg_names", tuple(a.name for a in self.args))


def _image(name: str, shape: tuple) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise LayerError(f"{name} expects an image-shaped input CxHxW, got {fmt_shape(shape)}",
                         hint="convolutions and pools come before `gap`/`flatten`")
    return shape


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _positive(args: dict, *names: str) -> None:
    for n in names:
        if args[n] is not None and args[n] < 1:
            raise LayerError(f"`{n}` must be at least 1, got {args[n]}", arg=n)


def _conv(kind: str):
    def resolve(shape, a):
        c, h, w = _image(kind, shape)
        k = a.get("kernel", 1)
        if kind == "dwconv":
            out, groups = c * a["multiplier"], c
        elif kind == "pwconv":
            out, groups = a["out"], 1
        else:
            out, groups = a["out"], a["groups"]
        _positive({"out": out, "kernel": k, "stride": a.get("stride", 1), "groups": groups,
                   "dilation": a.get("dilation", 1)}, "out", "kernel", "stride", "groups", "dilation")
        if a.get("in") is not None and a["in"] != c:
            raise LayerError(f"{kind} declares in={a['in']} input channels but its input has {c}", arg="in",
                             hint="drop `in=` to infer it from the previous layer")
        if c % groups or out % groups:
            raise LayerError(f"groups={groups} must divide the input channels ({c}) and the output channels ({out})",
                             arg="groups")
        stride, dilation = a.get("stride", 1), a.get("dilation", 1)
        padding = a.get("padding")
        if padding is None:
            padding = dilation * (k - 1) // 2  # "same" size for odd kernels at stride 1
        ho, wo = _conv_out(h, k, stride, padding, dilation), _conv_out(w, k, stride, padding, dilation)
        if ho < 1 or wo < 1:
            raise LayerError(f"{kind} with kernel {k} cannot take a {h}x{w} input (output would be {ho}x{wo})",
                             hint="use a larger input or fewer downsampling layers")
        attrs = {"in": c, "out": out, "kernel": k, "stride": stride, "padding": padding, "groups": groups,
                 "dilation": dilation, "bias": a["bias"]}
        return "conv", attrs, (out, ho, wo)

    return resolve


def _bn(shape, a):
    if len(shape) not in (1, 3):
        raise LayerError(f"bn expects CxHxW or a flat input, got {fmt_shape(shape)}")
    return "bn", {"channels": shape[0], "eps": a["eps"], "momentum": a["momentum"], "affine": a["affine"],
                  "dims": len(shape)}, shape


def _act(name: str):
    def resolve(shape, a):
        attrs = {"fn": name}
        if name == "leaky_relu":
            attrs["slope"] = a["slope"]
        return "act", attrs, shape

    return resolve


def _pool(kind: str):
    def resolve(shape, a):
        c, h, w = _image(kind, shape)
        k = a["kernel"]
        stride = a["stride"] if a["stride"] is not None else k
        _positive({"kernel": k, "stride": stride}, "kernel", "stride")
        if a["padding"] * 2 > k:
            raise LayerError(f"padding {a['padding']} is more than half the kernel ({k})", arg="padding")
        ho, wo = _conv_out(h, k, stride, a["padding"]), _conv_out(w, k, stride, a["padding"])
        if ho < 1 or wo < 1:
            raise LayerError(f"{kind}({k}) cannot take a {h}x{w} input",
                             hint="remove a pooling layer or use a larger input")
        return kind, {"kernel": k, "stride": stride, "padding": a["padding"]}, (c, ho, wo)

    return resolve


def _gap(shape, a):
    c, _, _ = _image("gap", shape)
    return "gap", {}, (c, 1, 1)


def _flatten(shape, a):
    return "flatten", {}, (math.prod(shape),)


def _dropout(shape, a):
    if not 0.0 <= a["p"] < 1.0:
        raise LayerError(f"dropout probability must be in [0, 1), got {a['p']}", arg="p")
    return "dropout", {"p": a["p"]}, shape


def _linear(shape, a):
    if len(shape) != 1:
        raise LayerError(f"linear expects a flat input, got {fmt_shape(shape)}",
                         hint="insert `flatten` before it (after `gap` for conv features)")
    _positive(a, "out")
    if a.get("in") is not None and a["in"] != shape[0]:
        raise LayerError(f"linear declares in={a['in']} input features but its input has {shape[0]}", arg="in",
                         hint="drop `in=` to infer it from the previous layer")
    return "linear", {"in": shape[0], "out": a["out"], "bias": a["bias"]}, (a["out"],)


def _identity(shape, a):
    return "identity", {}, shape


_B = ArgSpec
_CONV_TAIL = (_B("stride", "int", 1), _B("padding", "int", None), _B("dilation", "int", 1), _B("bias", "bool", True))

LAYERS: dict[str, LayerKind] = {k.name: k for k in [
    LayerKind("conv", (_B("out", "int"), _B("kernel", "int", 3), *_CONV_TAIL[:3], _B("groups", "int", 1),
                       _CONV_TAIL[3], _B("scale", "bool", True), _B("in", "int", None)),
              _conv("conv"), "2-D convolution; padding defaults to (kernel-1)//2", scalable=True),
    LayerKind("dwconv", (_B("kernel", "int", 3), *_CONV_TAIL, _B("multiplier", "int", 1)),
              _conv("dwconv"), "depthwise convolution (groups = input channels)"),
    LayerKind("pwconv", (_B("out", "int"), _B("bias", "bool", True), _B("scale", "bool", True), _B("in", "int", None)),
              _conv("pwconv"), "pointwise (1x1) convolution", scalable=True),
    LayerKind("bn", (_B("eps", "float", 1e-5), _B("momentum", "float", 0.1), _B("affine", "bool", True)),
              _bn, "batch normalisation (2-D for images, 1-D for flat inputs)"),
    *[LayerKind(n, (), _act(n), f"{n} activation") for n in
      ("relu", "relu6", "gelu", "silu", "hardswish", "sigmoid", "tanh")],
    LayerKind("leaky_relu", (_B("slope", "float", 0.01),), _act("leaky_relu"), "leaky ReLU"),
    LayerKind("maxpool", (_B("kernel", "int", 2), _B("stride", "int", None), _B("padding", "int", 0)),
              _pool("maxpool"), "max pooling; stride defaults to the kernel"),
    LayerKind("avgpool", (_B("kernel", "int", 2), _B("stride", "int", None), _B("padding", "int", 0)),
              _pool("avgpool"), "average pooling; stride defaults to the kernel"),
    LayerKind("gap", (), _gap, "global average pooling to Cx1x1"),
    LayerKind("flatten", (), _flatten, "flatten to one dimension"),
    LayerKind("dropout", (_B("p", "float", 0.5),), _dropout, "dropout"),
    LayerKind("linear", (_B("out", "int"), _B("bias", "bool", True), _B("scale", "bool", True), _B("in", "int", None)),
              _linear, "fully connected layer", scalable=True),
    LayerKind("identity", (), _identity, "no-op"),
]}


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


def tensors(op: str, attrs: dict) -> list[Tensor]:
    """The state-dict entries a leaf op owns, in torch's registration order.

    BatchNorm's `num_batches_tracked` counter is left out on purpose: it is a
    training-time step count, not a weight, and nccompile never stores it.
    """
    if op == "conv":
        a = attrs
        out = [Tensor("weight", (a["out"], a["in"] // a["groups"], a["kernel"], a["kernel"]))]
        if a["bias"]:
            out.append(Tensor("bias", (a["out"],)))
        return out
    if op == "linear":
        out = [Tensor("weight", (attrs["out"], attrs["in"]))]
        if attrs["bias"]:
            out.append(Tensor("bias", (attrs["out"],)))
        return out
    if op == "bn":
        c = attrs["channels"]
        out = [Tensor("weight", (c,)), Tensor("bias", (c,))] if attrs["affine"] else []
        return out + [Tensor("running_mean", (c,), is_param=False), Tensor("running_var", (c,), is_param=False)]
    return []


def macs(op: str, attrs: dict, out_shape: tuple) -> int:
    """Multiply-accumulates of one forward pass of one sample (conv and linear only).

    Same convention as torch.utils.flop_counter, which counts 2 flops per MAC and
    ignores biases, normalisation and activations.
    """
    if op == "conv":
        a = attrs
        return math.prod(out_shape) * (a["in"] // a["groups"]) * a["kernel"] * a["kernel"]
    if op == "linear":
        return attrs["in"] * attrs["out"]
    return 0


def fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)
