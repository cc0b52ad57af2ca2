"""Model files: write and read the safetensors layout that `compiler.fileformat` sizes.

Files are written atomically (temporary file in the same folder, then rename), so an
interrupted run never leaves a half-written model file. Reading goes through
safetensors only: no code path unpickles a model file. A file carries its spec, so
`load_model` rebuilds the (dequantized) module from the file alone.
"""
from __future__ import annotations

import json
import lzma
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compiler import fileformat
from compiler.analysis import file_metadata, fold_pairs
from compiler.errors import NcError
from compiler.fileformat import WeightFormat, parse_format
from compiler.tree import Model


class WeightsError(NcError):
    """A weights file that cannot be read or does not fit its model."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or compiled) wrapper."""
    return getattr(module, "module", getattr(module, "_orig_mod", module))


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model file stores: the state dict minus BatchNorm's step counters."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")}


# --- quantization ----------------------------------------------------------------

def quantize(t: torch.Tensor, bits: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes round((w - min) / (max - min) * (2^bits - 1)) per row; returns (uint8 codes, [rows, 2] ranges)."""
    flat = t.detach().float().reshape(rows, -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    levels = 2 ** bits - 1
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    codes = torch.where(span > 0, torch.round((flat - lo) / safe * levels), torch.zeros_like(flat))
    return codes.to(torch.uint8).reshape(t.shape), torch.cat([lo, hi], 1)


def dequantize(codes: torch.Tensor, ranges: torch.Tensor, bits: int) -> torch.Tensor:
    rows = ranges.shape[0]
    flat = codes.float().reshape(rows, -1)
    lo, hi = ranges[:, :1], ranges[:, 1:]
    return (lo + flat / (2 ** bits - 1) * (hi - lo)).reshape(codes.shape)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes (uint8) into bytes, least significant bit first."""
    flat = codes.reshape(-1).to(torch.int64)
    planes = (flat.unsqueeze(1) >> torch.arange(bits)) & 1           # [n, bits]
    stream = planes.reshape(-1)
    pad = (-len(stream)) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[: numel * bits]
    return (stream.reshape(numel, bits) << torch.arange(bits)).sum(1).to(torch.uint8)


def encode(tensors: dict[str, torch.Tensor], fmt: WeightFormat | str) -> dict[str, torch.Tensor]:
    """The tensors of a file of format `fmt` (see compiler.fileformat for the layout)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    keep_dtype = torch.float16 if fmt.keep_dtype == "F16" else torch.float32
    if not fmt.quantized:
        dtype = torch.float32 if fmt.bits == 32 else torch.float16
        return {k: v.to(keep_dtype if fileformat.keeps(k, fmt) else dtype).contiguous() for k, v in tensors.items()}
    out, ranges = {}, []
    for name in sorted(tensors):
        t = tensors[name]
        if fileformat.keeps(name, fmt):
            out[name] = t.to(keep_dtype).contiguous()
            continue
        codes, r = quantize(t, fmt.bits, fileformat.range_rows(tuple(t.shape), fmt))
        out[name] = (codes if fmt.bits == 8 else pack_bits(codes, fmt.bits)).contiguous()
        ranges.append(r)
    out[fileformat.RANGES] = torch.cat(ranges) if ranges else torch.zeros((0, 2))
    return out


def decode(stored: dict[str, torch.Tensor], fmt: WeightFormat | str,
           shapes: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """Float tensors back from a file's tensors; bit-packed codes need the `shapes` (from the spec)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    if not fmt.quantized:
        return {k: v.float() for k, v in stored.items()}
    ranges = stored[fileformat.RANGES]
    out, row = {}, 0
    for name in sorted(k for k in stored if k != fileformat.RANGES):
        t = stored[name]
        if fileformat.keeps(name, fmt):
            out[name] = t.float()
            continue
        shape = tuple(t.shape) if fmt.bits == 8 else tuple(shapes[name])
        codes = t if fmt.bits == 8 else unpack_bits(t, fmt.bits, fileformat.numel(shape)).reshape(shape)
        rows = fileformat.range_rows(shape, fmt)
        out[name] = dequantize(codes, ranges[row:row + rows], fmt.bits)
        row += rows
    if row != ranges.shape[0]:
        raise ValueError(f"{fileformat.RANGES} has {ranges.shape[0]} rows, the tensors need {row}")
    return out


# --- BatchNorm folding -------------------------------------------------------------

def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    return module.get_submodule(path) if path else module


def _set(module: torch.nn.Module, path: str, child: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent), name, child)


def fold_structure(module: torch.nn.Module, model: Model) -> list[str]:
    """Turn every (conv, bn) pair into a conv with bias and an Identity; returns the BN paths."""
    folded = []
    for conv_node, bn_node in fold_pairs(model.root):
        conv = _get(module, conv_node.path)
        if conv.bias is None:
            conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
        _set(module, bn_node.path, torch.nn.Identity())
        folded.append(bn_node.path)
    return folded


@torch.no_grad()
def fold_batchnorm(module: torch.nn.Module, model: Model) -> torch.nn.Module:
    """Fold each BN that follows a conv into the conv (exact in eval mode); returns the module."""
    for conv_node, bn_node in fold_pairs(model.root):
        conv, bn = _get(module, conv_node.path), _get(module, bn_node.path)
        inv_std = 1 / torch.sqrt(bn.running_var + bn.eps)
        scale = bn.weight * inv_std if bn.affine else inv_std
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        new_bias = bias * scale + shift
        conv.bias = torch.nn.Parameter(new_bias.detach().clone())
        _set(module, bn_node.path, torch.nn.Identity())
    return module


# --- files ---------------------------------------------------------------------------

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


def model_bytes(module: torch.nn.Module, model: Model, fmt: WeightFormat | str = "fp32") -> bytes:
    """The model file's bytes; with `fold_bn` the module is folded on a copy first."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    if fmt.fold_bn:
        import copy

        module = fold_batchnorm(copy.deepcopy(module).eval(), model)
    return st_save(encode(state_tensors(module), fmt), metadata=file_metadata(model, fmt))


def save_model(module: torch.nn.Module, model: Model, path: str | Path, fmt: WeightFormat | str = "fp32") -> int:
    """Write `module`'s weights in format `fmt`; returns the file size in bytes."""
    data = model_bytes(module, model, fmt)
    atomic_write(Path(path), data)
    return len(data)


def compress_file(path: Path) -> Path:
    """`FILE.xz` beside `path` (lzma, preset 9); the model file itself stays as it is."""
    out = path.with_name(path.name + ".xz")
    atomic_write(out, lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    return out


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    data = path.read_bytes()
    if path.suffix == ".xz":
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as err:
            raise WeightsError(f"{path}: not a readable lzma file ({err})") from None
    return data


def read_raw(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stored tensors and metadata of a safetensors file, or a clear error."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        stored = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except Exception as err:  # safetensors raises its own error type for every malformed file
        raise WeightsError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}); "
                           "it may be truncated or not a model file (pickled .pt/.pth files are refused)") from None
    return {k: v for k, v in stored.items() if not k.endswith("num_batches_tracked")}, meta


def file_format(meta: dict[str, str]) -> WeightFormat:
    if "nccompile" not in meta:
        return parse_format("fp32")
    try:
        options = json.loads(meta.get("quant", "{}"))
        return parse_format(meta["format"], keep=options.get("keep", ()), keep_dtype=options.get("keep_dtype", "F32"),
                            fold_bn=options.get("fold_bn", False))
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"unreadable format in the file's metadata ({err})") from None


def read_state(path: str | Path, model: Model | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Float tensors and metadata of an nccompile model file or a plain safetensors state dict.

    Bit-packed formats need the model (for the tensor shapes); without one it comes from the file.
    """
    path = Path(path)
    stored, meta = read_raw(path)
    return _decoded(stored, meta, model, path), meta


def _decoded(stored: dict[str, torch.Tensor], meta: dict[str, str], model: Model | None,
             path: Path) -> dict[str, torch.Tensor]:
    fmt = file_format(meta)
    shapes = None
    if fmt.quantized and fmt.bits < 8:
        from compiler.analysis import weight_tensors

        shapes = dict(weight_tensors(model or model_of(meta, path), fmt.fold_bn))
    try:
        return decode(stored, fmt, shapes)
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: inconsistent {fmt.name} model file ({err})") from None


def model_of(meta: dict[str, str], path: Path) -> Model:
    """The elaborated model a file's metadata describes (its embedded spec)."""
    import compiler

    if "nccompile" not in meta or "spec" not in meta:
        raise WeightsError(f"{path}: no embedded spec (not an nccompile model file); "
                           "load it into a model built from its spec instead")
    try:
        params = json.loads(meta["params"])
        if not isinstance(params, dict):
            raise ValueError(f"params is a {type(params).__name__}, not a mapping")
        shape = tuple(int(s) for s in meta["input"].split("x"))
        return compiler.compile_source(meta["spec"], f"{path}#spec", syntax=meta.get("syntax", "dsl"),
                                       model=meta.get("model"), params=params, input_shape=shape)
    except (KeyError, ValueError) as err:
        raise WeightsError(f"{path}: damaged metadata ({err})") from None


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
                more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
                parts.append(f"{title}: {', '.join(items[:4])}{more}")
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=False)


def build_with_weights(model: Model, path: str | Path, seed: int = 0, raw=None) -> torch.nn.Module:
    """Build `model` and load a weights file into it (folding its structure where the file is folded).

    `raw` is the file's (stored tensors, metadata) when the caller has already read it.
    """
    import compiler

    path = Path(path)
    stored, meta = raw if raw is not None else read_raw(path)
    state = _decoded(stored, meta, model, path)
    module = compiler.build_module(model, seed=seed)
    if file_format(meta).fold_bn:
        fold_structure(module, model)
    load_into(module, state, str(path))
    return module.eval()


def load_model(path: str | Path) -> tuple[torch.nn.Module, Model, dict[str, str]]:
    """Rebuild the (dequantized) module from an nccompile model file alone (read once)."""
    path = Path(path)
    stored, meta = read_raw(path)
    model = model_of(meta, path)
    return build_with_weights(model, path, raw=(stored, meta)), model, meta
