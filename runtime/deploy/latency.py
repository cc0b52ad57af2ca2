"""How long a module takes on the machine that runs nccompile (PyTorch eager, batch as given), and the
timing loop the other runtimes' latencies share."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(call, runs: int, warmup: int = 3) -> float:
    """Median wall time of `call()` in milliseconds, after `warmup` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def latency_ms(module: torch.nn.Module, x: torch.Tensor, runs: int = 30) -> float:
    """Median wall time of one forward pass, in milliseconds (after warm-up)."""
    module.eval()
    with torch.no_grad():
        return median_ms(lambda: module(x), runs)
