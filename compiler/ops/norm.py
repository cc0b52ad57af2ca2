"""Normalisation and per-channel scaling: `bn` (nn.BatchNorm2d on images, nn.BatchNorm1d on flat
inputs), `layernorm` (over the channels at every position, as ConvNeXt's LayerNorm2d; over the
features of a flat input), `groupnorm` (nn.GroupNorm) and `layerscale` (a learned per-channel factor)."""
from __future__ import annotations

from .base import (
    BLOCKS,
    WEIGHTED,
    ArgSpec,
    LayerError,
    LayerKind,
    OpRecord,
    Tensor,
    boolean,
    fmt_shape,
    number,
    positive,
    role,
)


def _check(a: dict) -> None:
    if not a["eps"] > 0:
        raise LayerError(f"eps must be positive, got {a['eps']}", arg="eps")
    if not 0 <= a["momentum"] <= 1:
        raise LayerError(f"momentum must lie in [0, 1], got {a['momentum']}", arg="momentum")


def _resolve(shape, a):
    if len(shape) not in (1, 3):
        raise LayerError(f"bn expects CxHxW or a flat input, got {fmt_shape(shape)}")
    return "bn", {"channels": shape[0], "eps": a["eps"], "momentum": a["momentum"], "affine": a["affine"],
                  "dims": len(shape)}, shape


def _tensors(a: dict) -> list[Tensor]:
    """BatchNorm's `num_batches_tracked` counter is left out on purpose: a training-time step
    count, not a weight; nccompile never stores it."""
    c = a["channels"]
    out = [Tensor("weight", (c,)), Tensor("bias", (c,))] if a["affine"] else []
    return out + [Tensor("running_mean", (c,), is_param=False), Tensor("running_var", (c,), is_param=False)]


def _emit(node, arg) -> str:
    a = node.attrs
    return f"bn(eps={number(a['eps'])}, momentum={number(a['momentum'])}, affine={boolean(a['affine'])})"


def _eps(a: dict) -> None:
    if not a["eps"] > 0:
        raise LayerError(f"eps must be positive, got {a['eps']}", arg="eps")


def _layernorm(shape, a):
    if len(shape) not in (1, 3):
        raise LayerError(f"layernorm expects CxHxW or a flat input, got {fmt_shape(shape)}")
    return "layernorm", {"channels": shape[0], "eps": a["eps"], "dims": len(shape)}, shape


def _groupnorm_check(a: dict) -> None:
    _eps(a)
    positive(a, "groups")


def _groupnorm(shape, a):
    if len(shape) != 3:
        raise LayerError(f"groupnorm expects an image-shaped input CxHxW, got {fmt_shape(shape)}")
    if shape[0] % a["groups"]:
        raise LayerError(f"groupnorm: {a['groups']} groups do not divide {shape[0]} channels", arg="groups")
    return "groupnorm", {"channels": shape[0], "groups": a["groups"], "eps": a["eps"]}, shape


def _layerscale(shape, a):
    return "layerscale", {"channels": shape[0], "init": a["init"], "dims": len(shape)}, shape


def _affine(a: dict) -> list[Tensor]:
    return [Tensor("weight", (a["channels"],)), Tensor("bias", (a["channels"],))]


_B = ArgSpec
LAYER_KINDS = [
    # batch normalisation (2-D for images, 1-D for flat inputs)
    LayerKind("bn", "bn", (_B("eps", "float", 1e-5), _B("momentum", "float", 0.1), _B("affine", "bool", True)),
              _resolve, check=_check),
    # layer normalisation over the channels at each position (ConvNeXt's LayerNorm2d)
    LayerKind("layernorm", "layernorm", (_B("eps", "float", 1e-6),), _layernorm, check=_eps),
    LayerKind("groupnorm", "groupnorm", (_B("groups", "int"), _B("eps", "float", 1e-5)), _groupnorm,
              check=_groupnorm_check),
    # a learned per-channel factor, initialised to `init` (ConvNeXt's layer scale)
    LayerKind("layerscale", "layerscale", (_B("init", "float", 1e-6),), _layerscale),
]
def _rechannel(a: dict, in_channels: int, out_channels: int) -> None:
    a["channels"] = in_channels


def _bn_onnx(g, a: dict, x: str) -> str:
    if g.folded():  # folded into the conv before it by the model file's format
        return x
    c = a["channels"]
    scale, bias = ((g.weight("weight"), g.weight("bias")) if a["affine"]
                   else (g.const([1.0] * c), g.const([0.0] * c)))
    return g.node("BatchNormalization", [x, scale, bias, g.weight("running_mean"), g.weight("running_var")],
                  epsilon=a["eps"])


def _layernorm_onnx(g, a: dict, x: str) -> str:
    """Over the channels: LayerNorm2d moves them last, normalises, and moves them back."""
    scale, bias = g.weight("weight"), g.weight("bias")
    if a["dims"] == 1:
        return g.node("LayerNormalization", [x, scale, bias], axis=-1, epsilon=a["eps"])
    x = g.node("Transpose", [x], perm=[0, 2, 3, 1])
    x = g.node("LayerNormalization", [x, scale, bias], axis=-1, epsilon=a["eps"])
    return g.node("Transpose", [x], perm=[0, 3, 1, 2])


def _groupnorm_onnx(g, a: dict, x: str) -> str:
    """As torch exports GroupNorm: instance normalisation of each group, then the per-channel affine."""
    c, h, w = g.layer.in_shape
    n = a["groups"]
    x = g.node("Reshape", [x, g.const([0, n, -1], "I64")])
    x = g.node("InstanceNormalization", [x, g.const([1.0] * n), g.const([0.0] * n)], epsilon=a["eps"])
    x = g.node("Reshape", [x, g.const([0, c, h, w], "I64")])
    per_channel = g.const([-1, 1, 1], "I64")
    x = g.node("Mul", [x, g.node("Reshape", [g.weight("weight"), per_channel])])
    return g.node("Add", [x, g.node("Reshape", [g.weight("bias"), per_channel])])


OPS = [OpRecord("bn", _emit, role(WEIGHTED), _tensors, rechannel=_rechannel, fresh=True,
                channel_scale=lambda a: "weight" if a["affine"] else None, onnx=_bn_onnx),  # gamma: network slimming
       OpRecord("layernorm", lambda node, arg: f"layernorm(eps={number(node.attrs['eps'])})", role(WEIGHTED),
                _affine, rechannel=_rechannel, fresh=True, onnx=_layernorm_onnx),
       # pruning would have to keep every group's channel count equal: its channels stay tied
       OpRecord("groupnorm", lambda node, arg: f"groupnorm({node.attrs['groups']}, eps={number(node.attrs['eps'])})",
                role(BLOCKS), _affine, fresh=True, onnx=_groupnorm_onnx),
       OpRecord("layerscale", lambda node, arg: f"layerscale({number(node.attrs['init'])})", role(WEIGHTED),
                lambda a: [Tensor("scale", (a["channels"],) + (1, 1) * (a["dims"] == 3))], rechannel=_rechannel,
                fresh=True, onnx=lambda g, a, x: g.node("Mul", [x, g.weight("scale")]))]
