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
from compiler.errors import NcError
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


class WeightsError(NcError):
    """A weights file that cannot be read or does not fit its model."""


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Float tensors and metadata of an nccompile model file or a plain safetensors state dict.

    Only safetensors is accepted: nothing here unpickles.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    data = path.read_bytes()
    try:
        stored = st_load(data)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for every malformed file
        raise WeightsError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}); "
                           "it may be truncated or not a model file (pickled .pt/.pth files are refused)") from None
    stored = {k: v for k, v in stored.items() if not k.endswith("num_batches_tracked")}
    fmt = meta.get("format", "fp32") if "nccompile" in meta else "fp32"
    try:
        return decode(stored, fmt), meta
    except (KeyError, IndexError, RuntimeError, ValueError) as err:
        raise WeightsError(f"{path}: inconsistent {fmt} model file ({err})") from None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`, or say exactly what does not fit."""
    own = state_tensors(module)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                parts.append(f"{title}: {', '.join(items[:4])}" + (f" (+{len(items) - 4} more)" if len(items) > 4 else ""))
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(parts))
    module.load_state_dict({k: v for k, v in state.items()}, strict=False)
