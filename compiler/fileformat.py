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

    fp32   every tensor as F32                      data = 4 * n
    fp16   every tensor as F16                      data = 2 * n
    int8   the seed's scheme: per tensor, uint8 codes round((w - min) / (max - min) * 255)
           stored under the tensor's own name (U8, same shape), plus one F32 tensor
           `nccompile.ranges` of shape [T, 2] with (min, max) of each of the T
           tensors in name order                     data = n + 8 * T

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

FORMATS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPE_BYTES[self.dtype]


def stored_tensors(tensors: list[tuple[str, tuple[int, ...]]], fmt: str) -> list[StoredTensor]:
    """What a file of format `fmt` stores for the given (name, shape) float tensors."""
    if fmt == "fp32":
        return [StoredTensor(n, "F32", tuple(s)) for n, s in tensors]
    if fmt == "fp16":
        return [StoredTensor(n, "F16", tuple(s)) for n, s in tensors]
    if fmt == "int8":
        out = [StoredTensor(n, "U8", tuple(s)) for n, s in tensors]
        return out + [StoredTensor(RANGES, "F32", (len(tensors), 2))]
    raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")


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


def metadata(*, fmt: str, model: str, spec_source: str, syntax: str, params: dict, input_shape) -> dict[str, str]:
    """The `__metadata__` every nccompile file carries (all values are strings)."""
    return {
        "nccompile": FILE_VERSION,
        "format": fmt,
        "model": model,
        "syntax": syntax,
        "params": _dumps(dict(sorted(params.items()))),
        "input": "x".join(str(s) for s in input_shape),
        "spec": spec_source,
    }
