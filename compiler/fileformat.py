"""The nccompile model file and its exact size, computed without torch.

A model file is a safetensors file (no pickle anywhere):

    8 bytes     little-endian u64: N, the header length
    N bytes     JSON header, padded with spaces to a multiple of 8
    data        every tensor's bytes, back to back

The header holds one entry per stored tensor
`"name":{"dtype":"F32","shape":[16,3,3,3],"data_offsets":[begin,end]}` and a
`__metadata__` map of strings that makes the file self-describing: the spec
source, the model name, the parameter values and input shape it was built with,
and the weight format. Tensors are ordered as the safetensors library writes
them (dtype size descending, then name), which fixes every offset and so the
header's exact length.

Weight formats (which tensors: every state-dict entry except BatchNorm's
`num_batches_tracked` step counter, i.e. parameters + running statistics):

    fp32, fp16     every tensor as F32 / F16                         data = 4n / 2n
    intN[-tensor]  per tensor (min, max) and N-bit codes              data = codes + 8R
                   round((w - min) / (max - min) * (2^N - 1)); int8 is the course's scheme
    intN-channel   one (min, max) per output channel of each tensor with 2+ dims

    codes: N = 8 -> one byte per element, the tensor's own name and shape (U8);
           N < 8 -> bit-packed, ceil(numel * N / 8) bytes, shape [bytes] (U8)
    R: (min, max) pairs, all in one F32 tensor `nccompile.ranges` [R, 2], in
       tensor-name order
    options: `keep` patterns store matching tensors as F32/F16 instead of codes;
       `fold_bn` folds each BatchNorm that follows a conv into that conv first
       (the BN tensors disappear, the conv gains a bias), listed in the metadata.

    file bytes = 8 + pad8(len(header JSON)) + data

where n is the number of stored elements. The runtime writes files with the
safetensors library; tests check that this formula gives their size to the byte.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

FILE_VERSION = "1"
RANGES = "nccompile.ranges"

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
# safetensors' dtype enum order; the library sorts tensors by it, descending.
_DTYPE_RANK = {d: i for i, d in enumerate(
    ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"])}


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class WeightFormat:
    """How a model file stores its tensors.

    scheme  float:   every tensor as F32 (fp32) or F16 (fp16)
            tensor:  per tensor, min and max plus unsigned `bits`-bit codes (the course's scheme at 8 bits)
            channel: like tensor, but one (min, max) per output channel of every tensor with 2+ dims
    keep      fnmatch patterns of tensor names stored as floats instead (e.g. "*.bias")
    keep_dtype  F32 or F16 for those
    fold_bn   fold every BatchNorm that directly follows a conv into that conv first
    """

    name: str
    scheme: str
    bits: int
    keep: tuple[str, ...] = ()
    keep_dtype: str = "F32"
    fold_bn: bool = False

    @property
    def quantized(self) -> bool:
        return self.scheme != "float"

    def options(self) -> dict:
        """The parts of the format a reader needs, stored in the file's metadata."""
        return {"scheme": self.scheme, "bits": self.bits, "keep": list(self.keep), "keep_dtype": self.keep_dtype,
                "fold_bn": self.fold_bn}


# Formats a budget may name and the summary lists. `int8` is the course's scheme (= int8-tensor).
SUMMARY_FORMATS = ("fp32", "fp16", "int8", "int8-channel", "int4", "int2")
FORMAT_HELP = "fp32, fp16, int8 (= int8-tensor), intN or intN-tensor or intN-channel for N in 2..8"


def parse_format(name: str, *, keep=(), keep_dtype: str = "F32", fold_bn: bool = False) -> WeightFormat:
    """`fp32`, `fp16`, `int8`, `int8-tensor`, `int8-channel`, `int4`, `int2-channel`, ..."""
    if name in ("fp32", "fp16"):
        return WeightFormat(name, "float", int(name[2:]), tuple(keep), keep_dtype, fold_bn)
    base, _, scheme = name.partition("-")
    scheme = scheme or "tensor"
    if base.startswith("int") and base[3:].isdigit() and 2 <= int(base[3:]) <= 8 and scheme in ("tensor", "channel"):
        canonical = base if scheme == "tensor" else f"{base}-channel"
        return WeightFormat(canonical, scheme, int(base[3:]), tuple(keep), keep_dtype, fold_bn)
    raise ValueError(f"unknown weight format {name!r}; known: {FORMAT_HELP}")


def is_format(name: str) -> bool:
    try:
        parse_format(name)
        return True
    except ValueError:
        return False


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def range_rows(shape, fmt: WeightFormat) -> int:
    """How many (min, max) pairs a quantized tensor of this shape has."""
    return shape[0] if fmt.scheme == "channel" and len(shape) >= 2 else 1


def code_shape(shape, bits: int) -> tuple[int, ...]:
    """8-bit codes keep the tensor's shape; narrower codes are bit-packed into ceil(n * bits / 8) bytes."""
    return tuple(shape) if bits == 8 else ((numel(shape) * bits + 7) // 8,)


def keeps(name: str, fmt: WeightFormat) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(name, pattern) for pattern in fmt.keep)


def stored_tensors(tensors: list[tuple[str, tuple[int, ...]]], fmt: WeightFormat | str) -> list[StoredTensor]:
    """What a file of format `fmt` stores for the given (name, shape) float tensors.

    Quantized tensors are stored under their own names as U8 codes; their (min, max)
    pairs go, in tensor-name order, into one F32 tensor `nccompile.ranges` [R, 2].
    """
    if isinstance(fmt, str):
        fmt = parse_format(fmt)
    if not fmt.quantized:
        dtype = "F32" if fmt.bits == 32 else "F16"
        return [StoredTensor(n, fmt.keep_dtype if keeps(n, fmt) else dtype, tuple(s)) for n, s in tensors]
    out, rows = [], 0
    for name, shape in sorted(tensors):
        if keeps(name, fmt):
            out.append(StoredTensor(name, fmt.keep_dtype, tuple(shape)))
        else:
            out.append(StoredTensor(name, "U8", code_shape(shape, fmt.bits)))
            rows += range_rows(shape, fmt)
    return out + [StoredTensor(RANGES, "F32", (rows, 2))]


def ordered(stored: list[StoredTensor]) -> list[StoredTensor]:
    """The order in which safetensors lays tensors out (dtype rank descending, then name)."""
    return sorted(stored, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))


def _dumps(value) -> str:
    # serde_json, which safetensors uses, escapes exactly like this.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def header(stored: list[StoredTensor], metadata: dict[str, str]) -> bytes:
    parts = []
    if metadata:
        parts.append('"__metadata__":' + _dumps(metadata))
    offset = 0
    for t in ordered(stored):
        end = offset + t.nbytes
        parts.append(_dumps(t.name) + ':{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}'
                     % (t.dtype, _dumps(list(t.shape)), offset, end))
        offset = end
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def file_bytes(stored: list[StoredTensor], metadata: dict[str, str]) -> int:
    return 8 + len(header(stored, metadata)) + sum(t.nbytes for t in stored)


def metadata(*, fmt: WeightFormat, model: str, spec_source: str, syntax: str, params: dict, input_shape,
             folded: list[str] = ()) -> dict[str, str]:
    """The `__metadata__` every nccompile file carries (all values are strings).

    `folded` lists the BatchNorm layers folded into their convs (their tensors are absent).
    """
    return {
        "nccompile": FILE_VERSION,
        "format": fmt.name,
        "quant": _dumps({**fmt.options(), "folded": list(folded)}),
        "model": model,
        "syntax": syntax,
        "params": _dumps(dict(sorted(params.items()))),
        "input": "x".join(str(s) for s in input_shape),
        "spec": spec_source,
    }
