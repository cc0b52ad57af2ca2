"""Calibrated rounding for the `quantize` step: GPTQ (Frantar et al., 2022) on the file's own grid.

Round-to-nearest treats each weight alone. GPTQ rounds a layer's weights one input column at
a time and moves each rounding error onto the columns not yet rounded, weighted by the
inverse of H = X Xᵀ, the second moment of the layer's inputs on calibration images. The
layer's outputs, not its weights, stay close to the float ones. Layers go in model order,
each calibrated on the inputs of the already-rounded layers before it.

Each row's (min, max) is first narrowed where that lowers the squared rounding error (a grid
search, as GPTQ's `mse` option); the chosen rows go into the file as its ranges, so the
written codes are exactly the rounded weights.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from compiler.fileformat import WeightFormat, range_rows

from .codes import grid_codes, grid_values

_SHRINK = [1.0 - 0.025 * i for i in range(21)]  # range ends tried: 100% .. 50% of (min, max) about the centre


_CHUNK = 1 << 24  # unfolded input values held at once (64 MiB of float32)


class _Captured(Exception):
    """Stops the forward pass once the layer's input is seen."""


def _grid(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid value, with the files' arithmetic (so the written codes reproduce it)."""
    return grid_values(grid_codes(w, lo, hi, bits, clip=True), lo, hi, bits)


def mse_range(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row [R, n], the (lo, hi) among shrunk (min, max) ranges with the least squared error."""
    lo0, hi0 = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    best_lo, best_hi, best = lo0, hi0, None
    for s in _SHRINK:
        lo, hi = mid - half * s, mid + half * s
        if s == 1.0:
            lo, hi = lo0, hi0
        err = (_grid(rows, lo, hi, bits) - rows).pow(2).sum(1, keepdim=True)
        if best is None:
            best = err
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _layer_columns(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as [groups, d, samples] columns, d matching its weight's rows."""
    if isinstance(layer, torch.nn.Linear):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    g = layer.groups
    n, cd, p = cols.shape
    return cols.reshape(n, g, cd // g, p).permute(1, 2, 0, 3).reshape(g, cd // g, n * p)


def supported(layer: torch.nn.Module) -> bool:
    if isinstance(layer, torch.nn.Linear):
        return True
    return (isinstance(layer, torch.nn.Conv2d) and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str))


@torch.no_grad()
def _hessian(module: torch.nn.Module, layer: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    h, count = None, 0

    def grab(_, args):
        nonlocal h, count
        x = args[0].float()
        per_image = max(1, x[:1].numel() * (math.prod(layer.kernel_size) if hasattr(layer, "kernel_size") else 1))
        step = max(1, _CHUNK // per_image)  # unfolded patches of a few images at a time: bounded memory
        for i in range(0, len(x), step):
            cols = _layer_columns(layer, x[i:i + step])
            part = cols @ cols.transpose(1, 2)
            h = part if h is None else h + part
            count += cols.shape[2]
        raise _Captured

    handle = layer.register_forward_pre_hook(grab)
    try:
        for x in batches:
            try:
                module(x)
            except _Captured:
                pass
    finally:
        handle.remove()
    return h / max(1, count)


@torch.no_grad()
def gptq_layer(weight: torch.Tensor, h: torch.Tensor, fmt: WeightFormat, damp: float = 0.01):
    """GPTQ of one weight [out, ...] with H [groups, d, d]; returns (rounded weight, [rows, 2] ranges)."""
    g, d = h.shape[0], h.shape[1]
    out = weight.shape[0]
    w = weight.detach().float().reshape(g, out // g, d).clone()
    rows = range_rows(tuple(weight.shape), fmt)
    lo, hi = mse_range(weight.detach().float().reshape(rows, -1), fmt.bits)
    lo_w = lo.reshape(g, out // g, 1) if rows > 1 else lo.reshape(1, 1, 1).expand(g, out // g, 1)
    hi_w = hi.reshape(g, out // g, 1) if rows > 1 else hi.reshape(1, 1, 1).expand(g, out // g, 1)
    h = h.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    w.masked_fill_(dead.unsqueeze(1), 0.0)
    diag += damp * diag.mean(1, keepdim=True)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # numerically singular even after damping: round to nearest
        nearest = _grid(weight.detach().float().reshape(rows, -1), lo, hi, fmt.bits)
        return nearest.reshape(weight.shape).to(weight.dtype), torch.cat([lo, hi], 1)
    q = torch.empty_like(w)
    for j in range(d):
        col = w[:, :, j]
        qc = _grid(col.unsqueeze(2), lo_w, hi_w, fmt.bits).squeeze(2)
        q[:, :, j] = qc
        err = (col - qc) / u[:, j, j].unsqueeze(1)
        w[:, :, j + 1:] -= err.unsqueeze(2) * u[:, j, j + 1:].unsqueeze(1)
    return q.reshape(weight.shape).to(weight.dtype), torch.cat([lo, hi], 1)


@torch.no_grad()
def calibrate(module: torch.nn.Module, fmt: WeightFormat, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round the weights of every conv and linear layer whose weight `fmt` quantizes, in place and in
    model order; returns their chosen ranges by tensor name (for runtime.weights.save_model)."""
    ranges = {}
    module.eval()
    for name, layer in list(module.named_modules()):
        tensor = f"{name}.weight" if name else "weight"
        if not supported(layer) or not fmt.of(tensor).quantized:
            continue
        h = _hessian(module, layer, batches)
        if h is None:  # a layer the forward pass never reaches
            continue
        q, r = gptq_layer(layer.weight, h, fmt.of(tensor))
        layer.weight.copy_(q)
        ranges[tensor] = r
    return ranges
