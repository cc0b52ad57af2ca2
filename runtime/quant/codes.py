"""Grid codes: the one rounding arithmetic of model files, quantization-aware training and calibrated
rounding, and the walk over a file's layout that turns float tensors into stored codes and back."""
from __future__ import annotations

import torch

from compiler import fileformat
from compiler.fileformat import WeightFormat, layout, parse_format


def grid_codes(flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int | None, round_fn=torch.round,
               clip: bool = False, levels: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of `flat` [rows, n] on the `bits`-bit grid from `lo` to `hi` of each row (0 where a row's
    range is empty), as floats. The one rounding arithmetic of the files, of quantization-aware
    training (`round_fn` with a straight-through gradient) and of calibrated rounding: they agree
    bit for bit. `levels` (2^bits - 1 per element, exact in float) replaces `bits` where tensors of
    several bit widths are rounded in one pass."""
    levels = 2 ** bits - 1 if levels is None else levels
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    codes = torch.where(span > 0, round_fn((flat - lo) / safe * levels), torch.zeros_like(flat))
    return codes.clamp(0, levels) if clip else codes


def grid_values(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int | None,
                levels: torch.Tensor | None = None) -> torch.Tensor:
    return lo + codes / (2 ** bits - 1 if levels is None else levels) * (hi - lo)


def quantize(t: torch.Tensor, bits: int, rows: int,
             given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes round((w - min) / (max - min) * (2^bits - 1)) per row; returns (uint8 codes, [rows, 2] ranges).
    `given` [rows, 2] ranges replace each row's (min, max); values outside are clipped."""
    flat = t.detach().float().reshape(rows, -1)
    if given is None:
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    else:
        given = given.to(flat.device, torch.float32)  # calibrated ranges come from where the model ran
        lo, hi = given[:, :1], given[:, 1:]
    codes = grid_codes(flat, lo, hi, bits, clip=given is not None)
    return codes.to(torch.uint8).reshape(t.shape), torch.cat([lo, hi], 1)


def dequantize(codes: torch.Tensor, ranges: torch.Tensor, bits: int) -> torch.Tensor:
    flat = codes.float().reshape(ranges.shape[0], -1)
    return grid_values(flat, ranges[:, :1], ranges[:, 1:], bits).reshape(codes.shape)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes (uint8) into bytes, least significant bit first."""
    flat = codes.reshape(-1).to(torch.int64)
    planes = (flat.unsqueeze(1) >> torch.arange(bits, device=flat.device)) & 1           # [n, bits]
    stream = planes.reshape(-1)
    pad = (-len(stream)) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, device=stream.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    return (stream.reshape(numel, bits) << torch.arange(bits, device=stream.device)).sum(1).to(torch.uint8)


TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def encode(tensors: dict[str, torch.Tensor], fmt: WeightFormat | str,
           ranges: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file of format `fmt`, by walking its layout (see compiler.fileformat).
    `ranges`: chosen (min, max) rows for some quantized tensors (calibrated rounding), by name."""
    ranges_given = ranges or {}
    lay = layout([(k, tuple(v.shape)) for k, v in tensors.items()], fmt)
    out, ranges = {}, []
    for e in lay.entries:
        t = tensors[e.name]
        if e.rows is None:
            out[e.name] = t.to(TORCH_DTYPES[e.stored.dtype]).contiguous()
            continue
        codes, r = quantize(t, e.bits, e.rows[1] - e.rows[0], ranges_given.get(e.name))
        out[e.name] = (codes if e.bits == 8 else pack_bits(codes, e.bits)).contiguous()
        ranges.append(r)
    if lay.ranges is not None:
        out[fileformat.RANGES] = torch.cat(ranges) if ranges else torch.zeros((0, 2))
    return out


def decode(stored: dict[str, torch.Tensor], fmt: WeightFormat | str,
           shapes: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """Float tensors back from a file's tensors, by walking the same layout. Bit-packed codes need
    the tensors' own `shapes` (from the spec); 8-bit codes and floats keep theirs."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    names = [k for k in stored if k != fileformat.RANGES]
    if shapes is None:
        shapes = {k: tuple(stored[k].shape) for k in names}
    lay = layout([(k, tuple(shapes[k])) for k in names], fmt)
    ranges = stored.get(fileformat.RANGES)
    if lay.ranges is not None and (ranges is None or tuple(ranges.shape) != lay.ranges.shape):
        got = None if ranges is None else tuple(ranges.shape)
        raise ValueError(f"{fileformat.RANGES} has shape {got}, the tensors need {lay.ranges.shape}")
    if ranges is not None and not torch.isfinite(ranges).all():
        raise ValueError(f"{fileformat.RANGES} holds values that are not finite numbers")
    out = {}
    for e in lay.entries:
        t = stored[e.name]
        if e.rows is None:
            out[e.name] = t.float()
            continue
        bits = e.bits
        codes = t if bits == 8 else unpack_bits(t, bits, fileformat.numel(e.shape)).reshape(e.shape)
        out[e.name] = dequantize(codes, ranges[e.rows[0]:e.rows[1]], bits)
    return out
