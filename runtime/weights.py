"""Model files: write and read the safetensors layout that `compiler.fileformat` sizes.

Files are written atomically (temporary file in the same folder, then rename), so an
interrupted run never leaves a half-written model file. Reading goes through
safetensors only: no code path unpickles a model file. A file carries its spec, so
`ModelFile(path).build()` rebuilds the (dequantized) module from the file alone.
"""
from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compiler import fileformat
from compiler.errors import NcError
from compiler.fileformat import (
    WeightFormat,
    file_metadata,
    layout,
    parse_format,
    stable_header,
    weight_tensors,
)
from compiler.tree import Model

from .files import atomic_write
from .quant.codes import DTYPE_NAMES, decode, encode
from .quant.fold import fold_batchnorm, fold_structure


class WeightsError(NcError):
    """A weights file that cannot be read or does not fit its model."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or compiled) wrapper."""
    return getattr(module, "module", getattr(module, "_orig_mod", module))


def host_tensor(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """`t` contiguous in host memory. `copy`: memory of its own also when `t` is already there (one copy
    at most: from a GPU, or from channels_last, the move is the copy)."""
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=copy)


def state_tensors(module: torch.nn.Module, copy: bool = False) -> dict[str, torch.Tensor]:
    """The tensors a model file stores, in host memory: the state dict minus BatchNorm's step counters."""
    return {k: host_tensor(v, copy) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


# --- files ---------------------------------------------------------------------------

def model_bytes(module: torch.nn.Module, model: Model, fmt: WeightFormat | str = "fp32",
                ranges: dict[str, torch.Tensor] | None = None) -> bytes:
    """The model file's bytes (`fmt` may be `spec`: the model's precision section); with `fold_bn` the
    module is folded on a copy first."""
    fmt = fileformat.model_format(model, fmt)
    if fmt.fold_bn:
        import copy

        module = fold_batchnorm(copy.deepcopy(module).eval(), model)
    return stable_header(st_save(encode(state_tensors(module), fmt, ranges), metadata=file_metadata(model, fmt)))


def save_model(module: torch.nn.Module, model: Model, path: str | Path, fmt: WeightFormat | str = "fp32",
               ranges: dict[str, torch.Tensor] | None = None) -> int:
    """Write `module`'s weights in format `fmt` (`ranges`: see `encode`); returns the file size in bytes."""
    data = model_bytes(module, model, fmt, ranges)
    atomic_write(Path(path), data)
    return len(data)


def compress_file(path: Path) -> Path:
    """`FILE.xz` beside `path` (lzma, preset 9); the model file itself stays as it is."""
    out = path.with_name(path.name + ".xz")
    atomic_write(out, lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    return out


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
        raise WeightsError(f"{path}: {what}; expected a weights file (.safetensors)")
    data = path.read_bytes()
    if path.suffix == ".xz":
        try:
            return _decompress_declared(path, data)
        except (lzma.LZMAError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise WeightsError(f"{path}: not a readable compressed model file ({err})") from None
    return data


_HEADER_CAP = 64 * 1024 * 1024


def _decompress_declared(path: Path, data: bytes) -> bytes:
    """An xz-compressed safetensors file, decompressed no further than its own header declares:
    a small file that expands to gigabytes stops at the first byte past that size."""
    d = lzma.LZMADecompressor()
    head = d.decompress(data, max_length=8)
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > _HEADER_CAP:
        raise ValueError(f"a header of {n:,} bytes")
    header = d.decompress(b"", max_length=n)
    entries = json.loads(header)
    end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    from compiler.limits import limit

    if 8 + n + end > limit("model_bytes"):
        raise ValueError(f"it declares {8 + n + end:,} bytes, over NCCOMPILE_LIMIT_MODEL_BYTES")
    body = d.decompress(b"", max_length=end + 1)
    if len(body) != end:
        raise ValueError(f"it holds {'more' if len(body) > end else 'less'} data than its header declares")
    return head + header + body


class ModelFile:
    """A weights file, read once: an nccompile model file (self-describing: format and spec) or a
    plain safetensors state dict. Reading never unpickles."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = _read_bytes(self.path)
        try:
            stored = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            self.meta: dict[str, str] = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        except Exception as err:  # safetensors raises its own error type for every malformed file
            raise WeightsError(f"{self.path}: not a readable safetensors file ({str(err).splitlines()[0]}); "
                               "it may be truncated or not a model file (pickled .pt/.pth files are refused)"
                               ) from None
        self.stored = {k: v for k, v in stored.items() if not k.endswith("num_batches_tracked")}
        self.format = self._format()
        self._model: Model | None = None

    def _format(self) -> WeightFormat:
        if "nccompile" not in self.meta:
            return parse_format("fp32")
        try:
            options = json.loads(self.meta.get("quant", "{}"))
            return parse_format(self.meta["format"], keep=options.get("keep", ()),
                                keep_dtype=options.get("keep_dtype", "F32"), fold_bn=options.get("fold_bn", False),
                                overrides=options.get("overrides", ()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise WeightsError(f"{self.path}: unreadable format in the file's metadata ({err})") from None

    def model(self) -> Model:
        """The elaborated model the file's embedded spec describes."""
        if self._model is None:
            import compiler

            if "nccompile" not in self.meta or "spec" not in self.meta:
                raise WeightsError(f"{self.path}: no embedded spec (not an nccompile model file); "
                                   "load it into a model built from its spec instead")
            try:
                params = json.loads(self.meta["params"])
                if not isinstance(params, dict):
                    raise ValueError(f"params is a {type(params).__name__}, not a mapping")
                shape = tuple(int(s) for s in self.meta["input"].split("x"))
                model = compiler.compile_source(self.meta["spec"], f"{self.path}#spec",
                                                syntax=self.meta.get("syntax", "dsl"),
                                                model=self.meta.get("model"), params=params, input_shape=shape)
            except (KeyError, ValueError) as err:
                raise WeightsError(f"{self.path}: damaged metadata ({err})") from None
            self._check_against(model)
            self._model = model
        return self._model

    def _check_against(self, model: Model) -> None:
        """The embedded spec must predict exactly the tensors in the file, before anything is built."""
        if model.root.op == "torchvision" and not os.environ.get("NCCOMPILE_TRUST_TORCHVISION"):
            raise WeightsError(f"{self.path}: its spec is a torchvision model, which runs torchvision's code; "
                               "load it only from a source you trust (NCCOMPILE_TRUST_TORCHVISION=1)")
        expected = {t.name: (t.dtype, tuple(t.shape)) for t in layout(
            weight_tensors(model, self.format.fold_bn), self.format).stored()}
        found = {k: (DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in self.stored.items()}
        if expected != found:
            wrong = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
            raise WeightsError(f"{self.path}: its tensors do not match its embedded spec "
                               f"({len(wrong)} differ, e.g. {wrong[0]}); the file is damaged or forged")

    def state(self, model: Model | None = None) -> dict[str, torch.Tensor]:
        """The float tensors. Bit-packed formats need the model's shapes: `model`, else the embedded one."""
        shapes = None
        formats = [self.format] + [parse_format(f) for _, f in self.format.overrides]
        if any(f.quantized and f.bits < 8 for f in formats):
            shapes = dict(weight_tensors(model or self.model(), self.format.fold_bn))
        try:
            return decode(self.stored, self.format, shapes)
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as err:
            raise WeightsError(f"{self.path}: inconsistent {self.format.name} model file ({err})") from None

    def build(self, model: Model | None = None, seed: int = 0) -> torch.nn.Module:
        """`model` (default: the embedded one) built with these weights, folded as the file is, in eval mode."""
        import compiler

        model = model or self.model()
        state = self.state(model)
        module = compiler.build_module(model, seed=seed)
        if self.format.fold_bn:
            fold_structure(module, model)
        load_into(module, state, str(self.path))
        return module.eval()


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
