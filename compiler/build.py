"""Build: elaborated tree -> torch `nn.Module` with names that follow the spec.

Containers are `nn.Sequential` keyed by label or position (`features.3.dw.weight`);
residuals are `Residual(body, shortcut)`. Initialisation is torch's default for
each layer, drawn from a generator seeded by `seed`, so a spec and a seed always
give the same weights.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .ops import OPS
from .tree import Model, Node

ACTIVATIONS = {  # the nn class of each activation of compiler.ops.activation
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
}


class Residual(nn.Module):
    """body(x) + shortcut(x); an absent shortcut is the identity."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x):
        # the shortcut runs first, as torchvision's regnet runs its `proj` (the weight pairing of
        # runtime.torchvision_state follows forward order); addition is exact in either order
        short = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + short


class Join(nn.ModuleList):
    """Parallel branches (children "0", "1", ...), joined by concatenation along channels, addition or
    multiplication; with `split`, branch i receives its share of the input channels."""

    def __init__(self, branches: list[nn.Module], mode: str, split: list[int] | None):
        super().__init__(branches)
        self.mode, self.split = mode, split

    def forward(self, x):
        # indexed, never iterated: torch.fx (bench_deploy's FX int8 baseline) cannot iterate a traced split
        parts = torch.split(x, self.split, dim=1) if self.split else None
        outs = [branch(x if parts is None else parts[i]) for i, branch in enumerate(self)]
        if self.mode == "concat":
            return torch.cat(outs, dim=1)
        result = outs[0]
        for o in outs[1:]:
            result = result + o if self.mode == "add" else result * o
        return result


class ChannelShuffle(nn.Module):
    """torchvision's ShuffleNetV2 channel shuffle (reshape, transpose): unlike nn.ChannelShuffle it
    exports to ONNX and runs on quantized tensors."""

    def __init__(self, groups: int):
        # imported here, not in forward: torchvision's first import calls an op that ONNX tracing refuses
        from torchvision.models.shufflenetv2 import channel_shuffle

        super().__init__()
        self.groups = groups
        self.shuffle = channel_shuffle

    def forward(self, x):
        return self.shuffle(x, self.groups)


class LayerScale(nn.Module):
    """x times a learned per-channel factor (ConvNeXt's layer scale)."""

    def __init__(self, channels: int, init: float, dims: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,) + (1, 1) * (dims == 3), float(init)))

    def forward(self, x):
        return x * self.scale


def _layernorm(a):
    if a["dims"] == 1:
        return nn.LayerNorm(a["channels"], eps=a["eps"])
    from torchvision.models.convnext import LayerNorm2d

    return LayerNorm2d(a["channels"], eps=a["eps"])


def _droppath(a):
    from torchvision.ops import StochasticDepth

    return StochasticDepth(a["p"], "row")


def _conv(a):
    return nn.Conv2d(a["in"], a["out"], a["kernel"], stride=a["stride"], padding=a["padding"],
                     dilation=a["dilation"], groups=a["groups"], bias=a["bias"])


def _bn(a):
    cls = nn.BatchNorm2d if a["dims"] == 3 else nn.BatchNorm1d
    return cls(a["channels"], eps=a["eps"], momentum=a["momentum"], affine=a["affine"])


def _act(a):
    return nn.LeakyReLU(a["slope"]) if a["fn"] == "leaky_relu" else ACTIVATIONS[a["fn"]]()


def _torchvision(a):
    from .torchvision_ref import build_torchvision

    return build_torchvision(a["name"], a["kwargs"])


# One builder per op of compiler.ops, from the op's attrs (tested complete).
BUILDERS = {
    "conv": _conv,
    "linear": lambda a: nn.Linear(a["in"], a["out"], bias=a["bias"]),
    "bn": _bn,
    "act": _act,
    "maxpool": lambda a: nn.MaxPool2d(a["kernel"], a["stride"], a["padding"], ceil_mode=a.get("ceil", False)),
    "avgpool": lambda a: nn.AvgPool2d(a["kernel"], a["stride"], a["padding"], ceil_mode=a.get("ceil", False)),
    "gap": lambda a: nn.AdaptiveAvgPool2d(1),
    "flatten": lambda a: nn.Flatten(),
    "dropout": lambda a: nn.Dropout(a["p"]),
    "identity": lambda a: nn.Identity(),
    "layernorm": _layernorm,
    "groupnorm": lambda a: nn.GroupNorm(a["groups"], a["channels"], eps=a["eps"]),
    "layerscale": lambda a: LayerScale(a["channels"], a["init"], a["dims"]),
    "adaptive_avgpool": lambda a: nn.AdaptiveAvgPool2d(tuple(a["size"])),
    "droppath": _droppath,
    "shuffle": lambda a: ChannelShuffle(a["groups"]),
    "torchvision": _torchvision,
}


# Activations torch can run in place (as torchvision builds them); an op record says `fresh` when an
# activation may overwrite its output: a new tensor that its backward pass does not keep.
IN_PLACE = ("relu", "relu6", "hardswish", "silu")
_FRESH_CONTAINERS = {"residual", "join"}  # a sum, product or concatenation: a new tensor


def _fresh(node: Node) -> bool:
    if node.op == "seq":
        return bool(node.children) and _fresh(node.children[-1])
    return node.op in _FRESH_CONTAINERS or (node.op in OPS and OPS[node.op].fresh)


def _sequence(node: Node) -> nn.Sequential:
    """In-place activations where nothing else reads their input (1.3x faster at batch 1 on a CPU for
    mobilenet_v2): never first in a body, whose input a branch or shortcut shares."""
    modules, prev = OrderedDict(), None
    for c in node.children:
        m = modules[c.name] = build_node(c)
        if c.op == "act" and c.attrs["fn"] in IN_PLACE and prev is not None and _fresh(prev):
            m.inplace = True
        prev = c
    return nn.Sequential(modules)


def build_node(node: Node) -> nn.Module:
    if node.op == "seq":
        return _sequence(node)
    if node.op == "residual":
        parts = {c.name: c for c in node.children}
        shortcut = build_node(parts["shortcut"]) if "shortcut" in parts else None
        return Residual(build_node(parts["body"]), shortcut)
    if node.op == "join":
        return Join([build_node(c) for c in node.children], node.attrs["mode"], node.attrs["split"])
    if node.op not in BUILDERS:
        raise KeyError(f"no builder for op {node.op!r}: add one to compiler.build.BUILDERS")
    return BUILDERS[node.op](node.attrs)


def build(model: Model, seed: int | None = 0) -> nn.Module:
    """The model as an `nn.Module` in eval mode; same seed, same weights."""
    if seed is None:
        module = build_node(model.root)
    else:
        # fork_rng keeps the caller's global RNG state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build_node(model.root)
    return module.eval()
