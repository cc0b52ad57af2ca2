"""Quantization-aware training: every tensor a model file stores is seen in the forward pass as
the file will hold it.

Each stored tensor gets a parametrization (torch.nn.utils.parametrize) that rounds it to its
format's grid: `intN` codes over a (min, max) range per tensor or per output channel, fp16/bf16
by a cast, fp32 untouched. Rounding passes gradients straight through; with `learned` scales
the range ends are parameters trained with LSQ's gradient (the rounding error), and the
weights outside them are clipped. BatchNorm's running statistics are rounded only where they
are used (eval mode), so training still updates them.

During a forward pass all integer grids are computed together (runtime.quant.fusedquant): the same
arithmetic on one vector, instead of ~120 small kernels per tensor.

`bake` ends it: each tensor is clipped to its effective range and the parametrizations go.
The clipped tensor's own min and max are that range, so the min/max quantizer of the
`quantize` step writes exactly the codes the forward pass used, and the dequantized file
predicts what the trained model predicted.
"""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from compiler.fileformat import WeightFormat, range_rows, weight_tensors
from compiler.tree import Model

from .codes import TORCH_DTYPES, grid_codes, grid_values
from .fusedquant import FusedRounding

SCALES = ("learned", "minmax")


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward: the codes are exactly torch.round's."""

    @staticmethod
    def forward(ctx, v):
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _CastSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, dtype):
        return v.to(dtype).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def effective_range(flat: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None):
    """The range the codes span: the tensor's own (min, max) per row, narrowed by learned ends."""
    wmin, wmax = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    if lo is None:
        return wmin, wmax
    lo_e = torch.maximum(lo, wmin)
    return lo_e, torch.maximum(torch.minimum(hi, wmax), lo_e)


class FakeQuant(torch.nn.Module):
    """One stored tensor on its `bits`-bit grid of `rows` ranges (runtime.weights' grid arithmetic,
    so the codes agree with the file's bit for bit)."""

    def __init__(self, tensor: torch.Tensor, bits: int, rows: int, learned: bool, buffer: bool):
        super().__init__()
        self.bits, self.rows, self.buffer = bits, rows, buffer
        self.fused: FusedRounding | None = None  # the model's one-pass rounding, where attached with it
        self.lo = self.hi = None
        if learned:
            flat = tensor.detach().float().reshape(rows, -1)
            self.lo = torch.nn.Parameter(flat.amin(1, keepdim=True).clone())
            self.hi = torch.nn.Parameter(flat.amax(1, keepdim=True).clone())

    def clipped(self, x: torch.Tensor):
        flat = x.reshape(self.rows, -1)
        lo, hi = effective_range(flat, self.lo, self.hi)
        return torch.minimum(torch.maximum(flat, lo), hi), lo, hi

    def forward(self, x):
        if self.buffer and self.training:  # BatchNorm updates its statistics in place: hand over the tensor
            return x
        if self.fused is not None and (value := self.fused.value(self)) is not None:
            return value
        flat, lo, hi = self.clipped(x)
        codes = grid_codes(flat, lo, hi, self.bits, round_fn=_RoundSTE.apply)
        return grid_values(codes, lo, hi, self.bits).reshape(x.shape)


class FakeCast(torch.nn.Module):
    def __init__(self, dtype: torch.dtype, buffer: bool):
        super().__init__()
        self.dtype, self.buffer = dtype, buffer

    def forward(self, x):
        if self.buffer and self.training:
            return x
        return _CastSTE.apply(x, self.dtype)


_CASTS = {k: v for k, v in TORCH_DTYPES.items() if k in ("F16", "BF16")}  # float formats that round


def attach(module: torch.nn.Module, model: Model, fmt: WeightFormat, scales: str = "learned",
           fused: bool = True) -> int:
    """Parametrize every tensor the file of format `fmt` stores; returns how many were. `fused`: the
    integer grids are computed together, once per forward pass (runtime.quant.fusedquant); leave it off
    where torch.compile fuses the per-tensor arithmetic itself."""
    if fmt.fold_bn:
        raise ValueError("quantization-aware training does not fold BatchNorm; use a format without fold_bn")
    count, members = 0, []
    for name, shape in weight_tensors(model):
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        tensor = getattr(owner, attr)
        buffer = attr not in dict(owner.named_parameters(recurse=False))
        f = fmt.of(name)
        if f.quantized:
            p = FakeQuant(tensor, f.bits, range_rows(shape, f), scales == "learned" and not buffer, buffer)
        elif f.dtype in _CASTS:
            p = FakeCast(_CASTS[f.dtype], buffer)
        else:
            continue
        parametrize.register_parametrization(owner, attr, p.to(tensor.device))
        if isinstance(p, FakeQuant):
            members.append((owner, attr, p))
        count += 1
    if fused and members:
        rounding = FusedRounding(module, members, _RoundSTE.apply)
        for _, _, p in members:
            p.fused = rounding
    return count


@torch.no_grad()
def bake(module: torch.nn.Module) -> None:
    """Clip every quantized tensor to its effective range and remove the parametrizations: the
    module then holds plain tensors whose min/max quantization is what training saw."""
    for owner in list(module.modules()):
        if not parametrize.is_parametrized(owner):
            continue
        for attr in list(owner.parametrizations.keys()):
            plist = owner.parametrizations[attr]
            p = plist[0]
            if isinstance(p, FakeQuant) and p.fused is not None:
                p.fused.remove()  # its hooks go with the parametrizations
                p.fused = None
            if isinstance(p, FakeQuant) and p.lo is not None:
                original = plist.original
                flat, _, _ = p.clipped(original.float())
                original.copy_(flat.reshape(original.shape).to(original.dtype))
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)


def freeze_batchnorm(module: torch.nn.Module) -> int:
    """BatchNorm layers to eval mode (running statistics used, rounded, and no longer updated)."""
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n
