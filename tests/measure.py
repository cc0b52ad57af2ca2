"""Measuring a built module the plain PyTorch way, to cross-check the analysis; counting the
operators a step dispatches (tests and bench/bench_qat.py)."""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def measure(module: torch.nn.Module, input_shape) -> dict:
    """Parameters (sum of numel), every submodule's output shape (forward hooks), MACs (flop counter / 2)."""
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n, m in module.named_modules() if n]
    counter = FlopCounterMode(display=False)
    module.eval()
    try:
        with torch.no_grad(), counter:
            out = module(torch.randn(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return {
        "params": sum(p.numel() for p in module.parameters()),
        "shapes": shapes,
        "output": tuple(out.shape[1:]),
        "macs": counter.get_total_flops() // 2,
    }


def trained_like(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`module` in eval mode with BatchNorms that look trained (varied gamma, beta and statistics), so
    that a weight copied to the wrong channel shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.05)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


class Dispatched(TorchDispatchMode):
    """Counts every operator that reaches a kernel."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())
