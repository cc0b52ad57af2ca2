"""How long a module takes on the machine that runs nccompile: PyTorch eager, batch as given."""
from __future__ import annotations

import statistics
import time

import torch


def latency_ms(module: torch.nn.Module, x: torch.Tensor, runs: int = 30) -> float:
    """Median wall time of one forward pass, in milliseconds (after warm-up)."""
    module.eval()
    with torch.no_grad():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000
