"""Pooling: `maxpool`, `avgpool`, `gap` (global average), `adaptive_avgpool` (to a size) -> ops of the
same names. `ceil` is torch's ceil_mode (SqueezeNet's pools)."""
from __future__ import annotations

from ..errors import ExportError
from .base import PASSES, ArgSpec, LayerError, LayerKind, OpRecord, boolean, conv_out, image, positive, role


def _check(a: dict) -> None:
    positive(a, "kernel", "stride")
    if a["padding"] < 0:
        raise LayerError(f"padding must be at least 0, got {a['padding']}", arg="padding")
    if a["padding"] * 2 > a["kernel"]:
        raise LayerError(f"padding {a['padding']} is more than half the kernel ({a['kernel']})", arg="padding")


def pool_out(size: int, kernel: int, stride: int, padding: int, ceil: bool) -> int:
    """torch's pooling output size; with ceil_mode a last window must still start inside the input."""
    if not ceil:
        return conv_out(size, kernel, stride, padding)
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def _resolve(kind: str):
    def resolve(shape, a):
        c, h, w = image(kind, shape)
        k = a["kernel"]
        stride = a["stride"] if a["stride"] is not None else k
        ho, wo = (pool_out(n, k, stride, a["padding"], a["ceil"]) for n in (h, w))
        if ho < 1 or wo < 1:
            raise LayerError(f"{kind}({k}) cannot take a {h}x{w} input",
                             hint="remove a pooling layer or use a larger input")
        return kind, {"kernel": k, "stride": stride, "padding": a["padding"], "ceil": a["ceil"]}, (c, ho, wo)

    return resolve


def _gap(shape, a):
    c, _, _ = image("gap", shape)
    return "gap", {}, (c, 1, 1)


def _emit(node, arg) -> str:
    a = node.attrs
    ceil = f", ceil={boolean(True)}" if a.get("ceil") else ""
    return f"{node.op}(kernel={a['kernel']}, stride={a['stride']}, padding={a['padding']}{ceil})"


_WINDOW = (ArgSpec("kernel", "int", 2), ArgSpec("stride", "int", None), ArgSpec("padding", "int", 0),
           ArgSpec("ceil", "bool", False))
def _adaptive(shape, a):
    c, _, _ = image("adaptive_avgpool", shape)
    size = (a["size"], a["width"] if a["width"] is not None else a["size"])
    return "adaptive_avgpool", {"size": list(size)}, (c, *size)


def _adaptive_emit(node, arg) -> str:
    h, w = node.attrs["size"]
    return f"adaptive_avgpool({h}, {w})"


LAYER_KINDS = [
    # max pooling; stride defaults to the kernel
    LayerKind("maxpool", "maxpool", _WINDOW, _resolve("maxpool"),
              check=_check),
    # average pooling; stride defaults to the kernel
    LayerKind("avgpool", "avgpool", _WINDOW, _resolve("avgpool"),
              check=_check),
    # global average pooling to Cx1x1
    LayerKind("gap", "gap", (), _gap),
    # average pooling to size x size (or size x width) whatever the input
    LayerKind("adaptive_avgpool", "adaptive_avgpool", (ArgSpec("size", "int"), ArgSpec("width", "int", None)),
              _adaptive,
              check=lambda a: positive(a, "size", "width")),
]
def _window(op_type: str, **extra):
    def onnx(g, a: dict, x: str) -> str:
        k, s, p = a["kernel"], a["stride"], a["padding"]
        return g.node(op_type, [x], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, ceil_mode=int(a["ceil"]),
                      **extra)

    return onnx


def _adaptive_onnx(g, a: dict, x: str) -> str:
    """Global pooling, or equal windows where the size divides the input (as torch's own export)."""
    _, h, w = g.layer.in_shape
    oh, ow = a["size"]
    if (oh, ow) == (1, 1):
        return g.node("GlobalAveragePool", [x])
    if h % oh or w % ow:
        raise ExportError(f"{g.layer.path}: adaptive_avgpool to {oh}x{ow} of a {h}x{w} input has unequal windows, "
                      "which ONNX cannot express; choose sizes that divide the input")
    return g.node("AveragePool", [x], kernel_shape=[h // oh, w // ow], strides=[h // oh, w // ow])


OPS = [OpRecord("maxpool", _emit, role(PASSES), fresh=True, onnx=_window("MaxPool")),
       # torch's AvgPool2d counts the padding in its divisor (count_include_pad=True)
       OpRecord("avgpool", _emit, role(PASSES), fresh=True, onnx=_window("AveragePool", count_include_pad=1)),
       OpRecord("gap", lambda node, arg: "gap", role(PASSES), fresh=True,
                onnx=lambda g, a, x: g.node("GlobalAveragePool", [x])),
       OpRecord("adaptive_avgpool", _adaptive_emit, role(PASSES),
                out_shape=lambda a, in_shape, old: (in_shape[0], *a["size"]), fresh=True, onnx=_adaptive_onnx)]
