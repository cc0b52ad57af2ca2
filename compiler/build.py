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

from .tree import Model, Node

ACTIVATIONS = {  # the nn class of each activation of compiler.ops.activation
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
}


class Residual(nn.Module):
    """body(x) + shortcut(x); an absent shortcut is the identity."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x):
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


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
    "maxpool": lambda a: nn.MaxPool2d(a["kernel"], a["stride"], a["padding"]),
    "avgpool": lambda a: nn.AvgPool2d(a["kernel"], a["stride"], a["padding"]),
    "gap": lambda a: nn.AdaptiveAvgPool2d(1),
    "flatten": lambda a: nn.Flatten(),
    "dropout": lambda a: nn.Dropout(a["p"]),
    "identity": lambda a: nn.Identity(),
    "torchvision": _torchvision,
}


def build_node(node: Node) -> nn.Module:
    if node.op == "seq":
        return nn.Sequential(OrderedDict((c.name, build_node(c)) for c in node.children))
    if node.op == "residual":
        parts = {c.name: c for c in node.children}
        shortcut = build_node(parts["shortcut"]) if "shortcut" in parts else None
        return Residual(build_node(parts["body"]), shortcut)
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
