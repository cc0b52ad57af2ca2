"""`quantize` with `format: auto`: each layer's bits chosen for a byte budget.

Sensitivity: for every layer and candidate format, the layer alone is rounded as the file would
store it and the mean KL divergence of the model's predictions from the float model's is
measured on calibration images (the other layers stay float). Choice: the formats whose summed
sensitivity is least among those whose file fits the budget, a multiple-choice knapsack solved
exactly by dynamic programming over bytes. The data bytes of each choice are exact; the header
(which holds the rewritten spec) is added and the budget tightened until the predicted file,
rewritten spec and all, fits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compiler.errors import BudgetError
from compiler.fileformat import parse_format, predicted_bytes, range_rows
from compiler.rewrite import bitalloc
from compiler.tree import Model

from .codes import TORCH_DTYPES, dequantize, quantize


def _rounded(t: torch.Tensor, fmt: str) -> torch.Tensor:
    f = parse_format(fmt)
    if not f.quantized:
        return t.to(TORCH_DTYPES[f.dtype]).to(t.dtype)
    codes, ranges = quantize(t, f.bits, range_rows(tuple(t.shape), f))
    return dequantize(codes, ranges, f.bits).to(t.dtype)


@torch.no_grad()
def sensitivity(module: torch.nn.Module, model: Model, batches: list[torch.Tensor],
                candidates=bitalloc.AUTO_CANDIDATES) -> dict[str, dict[str, float]]:
    """layer path -> format -> mean KL(float || layer rounded) over the calibration images."""
    module.eval()
    reference = [F.log_softmax(module(x).float(), 1) for x in batches]
    state = module.state_dict()
    out: dict[str, dict[str, float]] = {}
    for layer in bitalloc.layers(model):
        originals = {name: state[name].clone() for name, _ in layer.tensors}
        out[layer.path] = {}
        for fmt in bitalloc.options(layer, candidates):
            for name, t in originals.items():
                state[name].copy_(_rounded(t, fmt))
            kl = torch.stack([F.kl_div(F.log_softmax(module(x).float(), 1), ref, log_target=True, reduction="sum")
                              for x, ref in zip(batches, reference)]).sum().item()  # one host sync per choice
            out[layer.path][fmt] = max(0.0, kl / sum(len(x) for x in batches))
        for name, t in originals.items():
            state[name].copy_(t)
    return out


def knapsack(items: list[list[tuple[int, float]]], capacity: int) -> list[int] | None:
    """One option per item, each (bytes, cost), with total bytes <= capacity and least total cost;
    the chosen option indices, or None when even the cheapest options do not fit."""
    if sum(min(b for b, _ in opts) for opts in items) > capacity:
        return None
    unit = max(1, capacity // 20_000)  # bytes rounded up to units: never over the capacity
    cells = capacity // unit + 1
    inf = math.inf
    best = torch.full((cells,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for opts in items:
        new = torch.full((cells,), inf, dtype=torch.float64)
        pick = torch.full((cells,), -1, dtype=torch.int16)
        for i, (size, cost) in enumerate(opts):
            w = -(-size // unit)
            if w >= cells:
                continue
            cand = torch.full((cells,), inf, dtype=torch.float64)
            cand[w:] = best[:cells - w] + cost
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, i), pick)
        best = new
        picks.append(pick)
    end = int(torch.argmin(best))
    if not math.isfinite(float(best[end])):
        return None
    chosen = []
    for opts, pick in zip(reversed(items), reversed(picks)):
        i = int(pick[end])
        chosen.append(i)
        end -= -(-opts[i][0] // unit)
    return chosen[::-1]


def choose(model: Model, sens: dict[str, dict[str, float]], budget: int, where: str,
           comment: str = "") -> tuple[dict[str, str], str, Model]:
    """The least sensitive formats whose file fits `budget` bytes: (layer -> format, spec text, model)."""
    layer_list = bitalloc.layers(model)
    items = [[(bitalloc.layer_bytes(layer, fmt), s) for fmt, s in sens[layer.path].items()] for layer in layer_list]
    names = [list(sens[layer.path]) for layer in layer_list]
    data_budget = budget - (predicted_bytes(model, "fp32") - sum(bitalloc.layer_bytes(la, "fp32")
                                                                 for la in layer_list))
    for _ in range(8):
        picked = knapsack(items, data_budget)
        if picked is None:
            break
        choice = {layer.path: names[k][i] for k, (layer, i) in enumerate(zip(layer_list, picked))}
        text, chosen = bitalloc.with_precision(model, choice, comment)
        size = predicted_bytes(chosen, "spec")
        if size <= budget:
            return choice, text, chosen
        data_budget -= size - budget
    _, least = bitalloc.smallest(model, [f for fs in names for f in fs])
    raise BudgetError(f"{where}: no choice of formats fits {budget:,} bytes: the smallest file, every layer in "
                      f"its cheapest format, takes {least:,} bytes\n  hint: raise the budget or make the model "
                      f"smaller")
