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

_ACTIVATIONS = {
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


def build_node(node: Node) -> nn.Module:
    op, a = node.op, node.attrs
    if op == "seq":
        return nn.Sequential(OrderedDict((c.name, build_node(c)) for c in node.children))
    if op == "residual":
        parts = {c.name: c for c in node.children}
        shortcut = build_node(parts["shortcut"]) if "shortcut" in parts else None
        return Residual(build_node(parts["body"]), shortcut)
    if op == "conv":
        return nn.Conv2d(a["in"], a["out"], a["kernel"], stride=a["stride"], padding=a["padding"],
                         dilation=a["dilation"], groups=a["groups"], bias=a["bias"])
    if op == "linear":
        return nn.Linear(a["in"], a["out"], bias=a["bias"])
    if op == "bn":
        cls = nn.BatchNorm2d if a["dims"] == 3 else nn.BatchNorm1d
        return cls(a["channels"], eps=a["eps"], momentum=a["momentum"], affine=a["affine"])
    if op == "act":
        if a["fn"] == "leaky_relu":
            return nn.LeakyReLU(a["slope"])
        return _ACTIVATIONS[a["fn"]]()
    if op == "maxpool":
        return nn.MaxPool2d(a["kernel"], a["stride"], a["padding"])
    if op == "avgpool":
        return nn.AvgPool2d(a["kernel"], a["stride"], a["padding"])
    if op == "gap":
        return nn.AdaptiveAvgPool2d(1)
    if op == "flatten":
        return nn.Flatten()
    if op == "dropout":
        return nn.Dropout(a["p"])
    if op == "identity":
        return nn.Identity()
    if op == "torchvision":
        from .torchvision_ref import build_torchvision

        return build_torchvision(a["name"], a["kwargs"])
    raise AssertionError(f"no builder for op {op!r}")  # layers.py and build.py out of step


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
