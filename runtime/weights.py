"""Model files: write and read the safetensors layout that `compiler.fileformat` sizes.

Files are written atomically (temporary file in the same folder, then rename), so an
interrupted run never leaves a half-written model file. Reading goes through
safetensors only: no code path unpickles a model file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compiler import fileformat
from compiler.analysis import file_metadata
from compiler.elaborate import Model


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model file stores: the state dict minus BatchNorm's step counters."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def quantize_int8_tensor(t: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """The seed's 8-bit scheme: uint8 codes round((w - min) / (max - min) * 255), plus (min, max)."""
    t = t.float()
    lo, hi = (t.min().item(), t.max().item()) if t.numel() else (0.0, 0.0)
    if hi > lo:
        codes = torch.round((t - lo) / (hi - lo) * 255).to(torch.uint8)
    else:
        codes = torch.zeros_like(t, dtype=torch.uint8)
    return codes, lo, hi


def dequantize_int8_tensor(codes: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return codes.float() / 255 * (hi - lo) + lo


def encode(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "fp32":
        return {k: v.float().contiguous() for k, v in tensors.items()}
    if fmt == "fp16":
        return {k: v.half().contiguous() for k, v in tensors.items()}
    if fmt == "int8":
        out, ranges = {}, []
        for name in sorted(tensors):
            codes, lo, hi = quantize_int8_tensor(tensors[name])
            out[name] = codes.contiguous()
            ranges.append((lo, hi))
        out[fileformat.RANGES] = torch.tensor(ranges, dtype=torch.float32).reshape(len(ranges), 2)
        return out
    raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(fileformat.FORMATS)}")


def decode(stored: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if fmt in ("fp32", "fp16"):
        return {k: v.float() for k, v in stored.items()}
    if fmt == "int8":
        ranges = stored[fileformat.RANGES]
        names = sorted(k for k in stored if k != fileformat.RANGES)
        return {n: dequantize_int8_tensor(stored[n], *ranges[i].tolist()) for i, n in enumerate(names)}
    raise ValueError(f"unknown weight format {fmt!r}")


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(module: torch.nn.Module, model: Model, path: str | Path, fmt: str = "fp32") -> int:
    """Write `module`'s weights in format `fmt`; returns the file size in bytes."""
    data = st_save(encode(state_tensors(module), fmt), metadata=file_metadata(model, fmt))
    atomic_write(Path(path), data)
    return len(data)
