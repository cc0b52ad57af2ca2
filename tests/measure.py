"""Measuring a built module the plain PyTorch way, to cross-check the analysis."""
from __future__ import annotations

import torch
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
