"""Quantization-aware training's rounding of every tensor in one pass per forward.

Rounded one tensor at a time (runtime.quant.fakequant.FakeQuant), a model's 64 stored tensors cost
about 120 small operators each per training step, 11x the step's own: on a GPU each is a kernel
launch, so quantization-aware training is bound by launches. Here all of them are laid end to
end in one vector, rows of per-channel (or per-tensor) ranges in order, and go through the very
same arithmetic once: per-row min and max (segment reductions), the learned range ends, the
clip, the grid. The values are bit for bit those of the per-tensor path; gradients differ only
in the order of their sums.

A forward pre-hook on the model opens a pass and a forward hook closes it; the first
parametrized tensor read in between computes them all, and the others read their slice.
Outside a forward (baking, checks) each tensor is rounded on its own, as before.
"""
from __future__ import annotations

import torch

from .codes import grid_codes, grid_values


class _RowsToElements(torch.autograd.Function):
    """Each row's value repeated over its elements; the gradient sums each row's elements in order
    (a segment sum, not an atomic scatter, so it does not vary from run to run on a GPU)."""

    @staticmethod
    def forward(ctx, rows, row_of, lengths):
        ctx.save_for_backward(lengths)
        return rows.index_select(0, row_of)

    @staticmethod
    def backward(ctx, grad):
        (lengths,) = ctx.saved_tensors
        return torch.segment_reduce(grad, "sum", lengths=lengths, unsafe=True), None, None


class _RowMinMax(torch.autograd.Function):
    """Each row's (min, max); the gradient of each is split evenly among the elements equal to it,
    as amin's and amax's are (segment_reduce's own gradient gives each tied element all of it)."""

    @staticmethod
    def forward(ctx, v, row_of, lengths):
        low = torch.segment_reduce(v, "min", lengths=lengths, unsafe=True)  # unsafe: no host sync to check
        high = torch.segment_reduce(v, "max", lengths=lengths, unsafe=True)
        ctx.save_for_backward(v, low, high, row_of, lengths)
        return low, high

    @staticmethod
    def backward(ctx, grad_low, grad_high):
        v, low, high, row_of, lengths = ctx.saved_tensors
        grad = None
        for g, extreme in ((grad_low, low), (grad_high, high)):
            ties = (v == extreme.index_select(0, row_of)).to(v.dtype)
            count = torch.segment_reduce(ties, "sum", lengths=lengths, unsafe=True)
            share = (g / count).index_select(0, row_of) * ties
            grad = share if grad is None else grad + share
        return grad, None, None


def _memory_order(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """`t` flattened without a copy where its layout allows (channels_last weights keep dim 0
    outermost, so each output channel's row stays whole), and the permutation that undoes it."""
    if t.is_contiguous():
        return t.view(-1), None
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1), (0, 3, 1, 2)
    return t.reshape(-1), None


class FusedRounding:
    """The rounding of a model's FakeQuant tensors, computed together once per forward pass."""

    def __init__(self, module: torch.nn.Module, members: list, round_fn):
        self.members = members            # (owner module, attribute, FakeQuant)
        self.round_fn = round_fn
        self._values: dict[int, torch.Tensor] | None = None
        self._open = False
        self._consts: dict = {}
        self._handles = [module.register_forward_pre_hook(self._begin),
                         module.register_forward_hook(self._end, always_call=True)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _begin(self, module, args) -> None:
        self._open, self._values = True, None

    def _end(self, module, args, output) -> None:
        self._open, self._values = False, None

    def value(self, fq) -> torch.Tensor | None:
        """`fq`'s rounded tensor in the open pass, or None outside a forward pass."""
        if not self._open:
            return None
        if self._values is None:
            self._values = self._compute()
        return self._values.get(id(fq))

    def _active(self):
        out = []
        for owner, attr, fq in self.members:
            if fq.buffer and fq.training:  # BatchNorm's statistics train unrounded (see FakeQuant)
                continue
            out.append((owner.parametrizations[attr].original, fq))
        return out

    def _constants(self, active, device, dtype):
        """Per element: its row and its levels; per row: its length and, where the range is not
        learned, the ends that leave the row's own min and max in force."""
        key = (device, dtype, tuple(id(fq) for _, fq in active))
        if key not in self._consts:
            lengths, levels, free_lo, free_hi = [], [], [], []
            for original, fq in active:
                rows = fq.rows
                lengths += [original.numel() // rows] * rows
                levels += [float(2 ** fq.bits - 1)] * rows
                learned = fq.lo is not None
                free_lo.append(None if learned else torch.full((rows,), -torch.inf, dtype=dtype, device=device))
                free_hi.append(None if learned else torch.full((rows,), torch.inf, dtype=dtype, device=device))
            lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
            row_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
            per_element_levels = torch.tensor(levels, dtype=dtype, device=device).index_select(0, row_of)
            self._consts[key] = (lengths_t, row_of, per_element_levels, free_lo, free_hi)
        return self._consts[key]

    def _compute(self) -> dict[int, torch.Tensor]:
        active = self._active()
        # buffers apart: rounded together with parameters they would join the autograd graph
        buffers = [(o, fq) for o, fq in active if fq.buffer]
        params = [(o, fq) for o, fq in active if not fq.buffer]
        return {**self._round(params), **self._round(buffers)}

    def _round(self, active) -> dict[int, torch.Tensor]:
        if not active:
            return {}
        first = active[0][0]
        if any(o.dtype != first.dtype or o.device != first.device for o, _ in active):
            return {}  # mixed tensors: each is rounded on its own
        lengths, row_of, levels, free_lo, free_hi = self._constants(active, first.device, first.dtype)
        flats, undo = zip(*(_memory_order(o) for o, _ in active))
        v = torch.cat(flats)
        lo = torch.cat([fq.lo.reshape(-1) if fq.lo is not None else f for (_, fq), f in zip(active, free_lo)])
        hi = torch.cat([fq.hi.reshape(-1) if fq.hi is not None else f for (_, fq), f in zip(active, free_hi)])
        # runtime.quant.fakequant.effective_range, for every row at once
        wmin, wmax = _RowMinMax.apply(v, row_of, lengths)
        lo_e = torch.maximum(lo, wmin)
        hi_e = torch.maximum(torch.minimum(hi, wmax), lo_e)
        lo_el = _RowsToElements.apply(lo_e, row_of, lengths)
        hi_el = _RowsToElements.apply(hi_e, row_of, lengths)
        clipped = torch.minimum(torch.maximum(v, lo_el), hi_el)
        codes = grid_codes(clipped, lo_el, hi_el, None, round_fn=self.round_fn, levels=levels)
        out = grid_values(codes, lo_el, hi_el, None, levels=levels)
        values = {}
        for piece, (original, fq), perm in zip(out.split([f.numel() for f in flats]), active, undo):
            if perm is None:
                values[id(fq)] = piece.view(original.shape)
            else:  # back to the channels_last tensor's logical order, still channels_last in memory
                n, c, h, w = original.shape
                values[id(fq)] = piece.view(n, h, w, c).permute(*perm)
        return values
