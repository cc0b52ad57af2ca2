"""`bn` -> op `bn` (nn.BatchNorm2d on images, nn.BatchNorm1d on flat inputs)."""
from __future__ import annotations

from .base import WEIGHTED, ArgSpec, LayerError, LayerKind, OpRecord, Tensor, boolean, fmt_shape, number, role


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


_B = ArgSpec
LAYER_KINDS = [
    LayerKind("bn", "bn", (_B("eps", "float", 1e-5), _B("momentum", "float", 0.1), _B("affine", "bool", True)),
              _resolve, "batch normalisation (2-D for images, 1-D for flat inputs)", check=_check),
]
def _rechannel(a: dict, in_channels: int, out_channels: int) -> None:
    a["channels"] = in_channels


OPS = [OpRecord("bn", _emit, role(WEIGHTED), _tensors, rechannel=_rechannel)]
