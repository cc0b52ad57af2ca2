"""Convolutions: `conv`, `dwconv` (depthwise), `pwconv` (pointwise) -> op `conv` (nn.Conv2d)."""
from __future__ import annotations

from .base import (
    BLOCKS,
    PRODUCES,
    WEIGHTED,
    ArgSpec,
    LayerError,
    LayerKind,
    OpRecord,
    Tensor,
    boolean,
    conv_out,
    image,
    positive,
)


def _check(a: dict) -> None:
    positive(a, *(n for n in ("out", "kernel", "stride", "groups", "dilation", "multiplier") if n in a))
    if a.get("padding") is not None and a["padding"] < 0:
        raise LayerError(f"padding must be at least 0, got {a['padding']}", arg="padding")


def _resolve(kind: str):
    def resolve(shape, a):
        c, h, w = image(kind, shape)
        k = a.get("kernel", 1)
        if kind == "dwconv":
            out, groups = c * a["multiplier"], c
        elif kind == "pwconv":
            out, groups = a["out"], 1
        else:
            out, groups = a["out"], a["groups"]
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
        ho, wo = conv_out(h, k, stride, padding, dilation), conv_out(w, k, stride, padding, dilation)
        if ho < 1 or wo < 1:
            raise LayerError(f"{kind} with kernel {k} cannot take a {h}x{w} input (output would be {ho}x{wo})",
                             hint="use a larger input or fewer downsampling layers")
        attrs = {"in": c, "out": out, "kernel": k, "stride": stride, "padding": padding, "groups": groups,
                 "dilation": dilation, "bias": a["bias"]}
        return "conv", attrs, (out, ho, wo)

    return resolve


def _tensors(a: dict) -> list[Tensor]:
    out = [Tensor("weight", (a["out"], a["in"] // a["groups"], a["kernel"], a["kernel"]))]
    if a["bias"]:
        out.append(Tensor("bias", (a["out"],)))
    return out


def _macs(a: dict, out_shape: tuple) -> int:
    n = 1
    for s in out_shape:
        n *= s
    return n * (a["in"] // a["groups"]) * a["kernel"] * a["kernel"]


def _emit(node, arg) -> str:
    a = node.attrs
    if node.layer == "dwconv" and a["groups"] == a["in"]:
        return (f"dwconv(kernel={a['kernel']}, stride={a['stride']}, padding={a['padding']}, "
                f"dilation={a['dilation']}, bias={boolean(a['bias'])}, multiplier={a['out'] // a['in']})")
    if node.layer == "pwconv" and a["kernel"] == 1 and a["stride"] == 1 and a["groups"] == 1:
        return f"pwconv({arg('out')}, bias={boolean(a['bias'])}, scale=false)"
    return (f"conv({arg('out')}, kernel={a['kernel']}, stride={a['stride']}, padding={a['padding']}, "
            f"dilation={a['dilation']}, groups={a['groups']}, bias={boolean(a['bias'])}, scale=false)")


def _role(a: dict) -> str:
    if a["groups"] == 1:
        return PRODUCES
    if a["groups"] == a["in"] == a["out"]:  # depthwise, multiplier 1: channels pass through, with weights
        return WEIGHTED
    return BLOCKS


_B = ArgSpec
_TAIL = (_B("stride", "int", 1), _B("padding", "int", None), _B("dilation", "int", 1), _B("bias", "bool", True))

LAYER_KINDS = [
    # 2-D convolution; padding defaults to (kernel-1)//2
    LayerKind("conv", "conv", (_B("out", "int"), _B("kernel", "int", 3), *_TAIL[:3], _B("groups", "int", 1), _TAIL[3],
                               _B("scale", "bool", True), _B("in", "int", None)),
              _resolve("conv"), scalable=True, check=_check),
    # depthwise convolution (groups = input channels)
    LayerKind("dwconv", "conv", (_B("kernel", "int", 3), *_TAIL, _B("multiplier", "int", 1)),
              _resolve("dwconv"), check=_check),
    # pointwise (1x1) convolution
    LayerKind("pwconv", "conv", (_B("out", "int"), _B("bias", "bool", True), _B("scale", "bool", True),
                                 _B("in", "int", None)),
              _resolve("pwconv"), scalable=True, check=_check),
]
def _rechannel(a: dict, in_channels: int, out_channels: int) -> None:
    depthwise = a["groups"] == a["in"] == a["out"]
    a["in"], a["out"] = in_channels, out_channels
    if depthwise:
        a["groups"] = in_channels


def _factor(a: dict, rank: int):
    """A k x k conv to `rank` outputs without bias, then a 1x1 conv to `out` with the original bias."""
    first = {"out": rank, "kernel": a["kernel"], "stride": a["stride"], "padding": a["padding"],
             "dilation": a["dilation"], "bias": False}
    return ("conv", first), ("pwconv", {"out": a["out"], "bias": a["bias"]})


def _onnx(g, a: dict, x: str) -> str:
    inputs = [x, g.weight("weight")] + ([g.weight("bias")] if g.has("bias") else [])  # a folded BN's bias too
    k, p, d, s = a["kernel"], a["padding"], a["dilation"], a["stride"]
    return g.node("Conv", inputs, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, dilations=[d, d],
                  group=a["groups"])


OPS = [OpRecord("conv", _emit, _role, _tensors, _macs, _rechannel, fresh=True, folds_bn=True, factor=_factor,
                factorizable=lambda a: a["groups"] == 1 and a["kernel"] > 1, onnx=_onnx)]
