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

    fp32, fp16, bf16  every tensor as F32 / F16 / BF16               data = 4n / 2n / 2n
    intN[-tensor]  per tensor (min, max) and N-bit codes              data = codes + 8R
                   round((w - min) / (max - min) * (2^N - 1)); int8 is the course's scheme
    intN-channel   one (min, max) per output channel of each tensor with 2+ dims

    codes: N = 8 -> one byte per element, the tensor's own name and shape (U8);
           N < 8 -> bit-packed, ceil(numel * N / 8) bytes, shape [bytes] (U8)
    R: (min, max) pairs, all in one F32 tensor `nccompile.ranges` [R, 2], in
       tensor-name order
    options: `keep` patterns store matching tensors as F32/F16 instead of codes;
       `overrides` give matching tensors another format of the list above (mixed
       precision: `fc.*` as int8 in an int4 file, `*.running_*` as fp16, ...), the
       first matching pattern wins, after `keep`;
       `fold_bn` folds each BatchNorm that follows a conv into that conv first
       (the BN tensors disappear, the conv gains a bias), listed in the metadata.

    file bytes = 8 + pad8(len(header JSON)) + data

where n is the number of stored elements. The runtime writes files with the
safetensors library; tests check that this formula gives their size to the byte.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from .ops import OPS
from .tree import Model, Node

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
    overrides (fnmatch pattern, format name) pairs: matching tensors use that format instead
    """

    name: str
    scheme: str
    bits: int
    keep: tuple[str, ...] = ()
    keep_dtype: str = "F32"
    fold_bn: bool = False
    dtype: str = "U8"         # how values are stored: F32 / F16 / BF16 for float formats, U8 codes otherwise
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def quantized(self) -> bool:
        return self.scheme != "float"

    def options(self) -> dict:
        """The parts of the format a reader needs, stored in the file's metadata."""
        options = {"scheme": self.scheme, "bits": self.bits, "keep": list(self.keep), "keep_dtype": self.keep_dtype,
                   "fold_bn": self.fold_bn}
        if self.overrides:  # only where used: the files of plain formats keep their exact size
            options["overrides"] = [list(o) for o in self.overrides]
        return options

    def of(self, name: str) -> WeightFormat:
        """The format tensor `name` is stored in (`keep` first, then the first matching override)."""
        if not self.keep and not self.overrides:
            return self
        from fnmatch import fnmatchcase

        if any(fnmatchcase(name, p) for p in self.keep):
            return parse_format("fp32" if self.keep_dtype == "F32" else "fp16")
        for pattern, fmt in self.overrides:
            if fnmatchcase(name, pattern):
                return parse_format(fmt)
        return self


# Formats a budget may name and the summary lists. `int8` is the course's scheme (= int8-tensor).
SUMMARY_FORMATS = ("fp32", "fp16", "int8", "int8-channel", "int4", "int2")
FORMAT_HELP = "fp32, fp16, bf16, int8 (= int8-tensor), intN or intN-tensor or intN-channel for N in 2..8"
FLOAT_FORMATS = {"fp32": ("F32", 32), "fp16": ("F16", 16), "bf16": ("BF16", 16)}


def parse_format(name: str, *, keep=(), keep_dtype: str = "F32", fold_bn: bool = False,
                 overrides=()) -> WeightFormat:
    """`fp32`, `fp16`, `bf16`, `int8`, `int8-tensor`, `int8-channel`, `int4`, `int2-channel`, ...;
    `overrides`: (pattern, format name) pairs for mixed precision."""
    overrides = tuple((str(p), str(f)) for p, f in overrides)
    for _, f in overrides:
        parse_format(f)  # each must be a plain format
    if name in FLOAT_FORMATS:
        dtype, bits = FLOAT_FORMATS[name]
        return WeightFormat(name, "float", bits, tuple(keep), keep_dtype, fold_bn, dtype, overrides)
    base, _, scheme = name.partition("-")
    scheme = scheme or "tensor"
    if base.startswith("int") and base[3:].isdigit() and 2 <= int(base[3:]) <= 8 and scheme in ("tensor", "channel"):
        canonical = base if scheme == "tensor" else f"{base}-channel"
        return WeightFormat(canonical, scheme, int(base[3:]), tuple(keep), keep_dtype, fold_bn, overrides=overrides)
    raise ValueError(f"unknown weight format {name!r}; known: {FORMAT_HELP}")


def every_format() -> list[str]:
    """Every plain format name parse_format accepts, canonical: a new format added there is listed here
    and so tested for exact bytes and read back (tests/test_file_bytes.py)."""
    ints = [f"int{b}" for b in range(2, 9)] + [f"int{b}-channel" for b in range(2, 9)]
    return [*FLOAT_FORMATS, *ints]


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


@dataclass(frozen=True)
class Entry:
    """One float tensor of the model and how the file stores it."""

    name: str
    shape: tuple[int, ...]           # the tensor's own shape
    stored: StoredTensor             # as stored: a float dtype, or U8 codes (bit-packed below 8 bits)
    rows: tuple[int, int] | None     # its (min, max) pairs: rows [start, stop) of `nccompile.ranges`
    bits: int | None = None          # code width of a quantized entry


@dataclass(frozen=True)
class Layout:
    """Everything a file of one format stores for one set of tensors, in the order ranges are kept.
    The analysis sizes files from it; encoding and decoding walk it."""

    format: WeightFormat
    entries: tuple[Entry, ...]
    ranges: StoredTensor | None      # `nccompile.ranges` [R, 2] F32 for quantized formats

    def stored(self) -> list[StoredTensor]:
        return [e.stored for e in self.entries] + ([self.ranges] if self.ranges is not None else [])


def layout(tensors: list[tuple[str, tuple[int, ...]]], fmt: WeightFormat | str) -> Layout:
    """The layout of a file of format `fmt` for (name, shape) float tensors.

    Float formats store each tensor in the format's dtype (or `keep_dtype` for kept ones).
    Quantized tensors are stored under their own names as U8 codes; their (min, max) pairs
    go, in tensor-name order, into one F32 tensor `nccompile.ranges` [R, 2].
    """
    if isinstance(fmt, str):
        fmt = parse_format(fmt)
    formats = {n: fmt.of(n) for n, _ in tensors}
    if not any(f.quantized for f in formats.values()):
        entries = tuple(Entry(n, tuple(s), StoredTensor(n, formats[n].dtype, tuple(s)), None) for n, s in tensors)
        return Layout(fmt, entries, None)
    entries, row = [], 0
    for name, shape in sorted(tensors):
        shape, f = tuple(shape), formats[name]
        if not f.quantized:
            entries.append(Entry(name, shape, StoredTensor(name, f.dtype, shape), None))
        else:
            n = range_rows(shape, f)
            entries.append(Entry(name, shape, StoredTensor(name, "U8", code_shape(shape, f.bits)), (row, row + n),
                                 f.bits))
            row += n
    return Layout(fmt, tuple(entries), StoredTensor(RANGES, "F32", (row, 2)))


def stored_tensors(tensors: list[tuple[str, tuple[int, ...]]], fmt: WeightFormat | str) -> list[StoredTensor]:
    """What a file of format `fmt` stores for the given (name, shape) float tensors."""
    return layout(tensors, fmt).stored()


def ordered(stored: list[StoredTensor]) -> list[StoredTensor]:
    """The order in which safetensors lays tensors out (dtype rank descending, then name)."""
    return sorted(stored, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))


def _dumps(value) -> str:
    # serde_json, which safetensors uses, escapes exactly like this.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=65536)
def _name_json(name: str) -> str:  # tensor names and the spec's text repeat across a search's configurations
    return _dumps(name)


def header(stored: list[StoredTensor], metadata: dict[str, str]) -> bytes:
    parts = []
    if metadata:  # = _dumps(metadata), with each string escaped once per search rather than per configuration
        parts.append('"__metadata__":{' + ",".join(f"{_name_json(k)}:{_name_json(v)}" for k, v in metadata.items())
                     + "}")
    offset = 0
    for t in ordered(stored):
        end = offset + t.nbytes
        parts.append(_name_json(t.name) + ':{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}'
                     % (t.dtype, ",".join(map(str, t.shape)), offset, end))  # ints: what serde_json writes
        offset = end
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def stable_header(data: bytes) -> bytes:
    """A written file's bytes with its `__metadata__` keys sorted. safetensors writes them from a Rust
    HashMap, in an order that changes from save to save; sorted, the same model always makes the same
    bytes. Only the order moves, so the length (and every predicted size) stays; a header that
    `_dumps` would not write back unchanged is left as it is."""
    n = int.from_bytes(data[:8], "little")
    try:
        text = data[8:8 + n].decode("utf-8")
        parsed = json.loads(text)
    except ValueError:  # not a header we can read: as written
        return data
    compact = text.rstrip(" ")  # the header's padding to an 8-byte boundary
    if _dumps(parsed) != compact or not isinstance(parsed.get("__metadata__"), dict):
        return data
    parsed["__metadata__"] = dict(sorted(parsed["__metadata__"].items()))
    return data[:8] + _dumps(parsed).encode("utf-8") + data[8 + len(compact.encode("utf-8")):]


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


# --- a model's file: which tensors, which metadata, how many bytes ------------------------

def as_format(fmt: str | WeightFormat) -> WeightFormat:
    return parse_format(fmt) if isinstance(fmt, str) else fmt


def fold_pairs(root: Node) -> list[tuple[Node, Node]]:
    """(layer, bn) pairs where a 2-D BatchNorm directly follows a layer whose record `folds_bn` (a conv)
    in the same sequence."""
    pairs = []
    for node in root.walk():
        if node.op != "seq":
            continue
        for a, b in zip(node.children, node.children[1:]):
            if (a.op in OPS and OPS[a.op].folds_bn and b.op == "bn" and b.attrs["dims"] == 3
                    and b.attrs["channels"] == a.attrs["out"]):
                pairs.append((a, b))
    return pairs


def weight_tensors(model: Model, fold_bn: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(state-dict name, shape) of every tensor a model file stores, in module order.

    With `fold_bn`, folded BatchNorms store nothing and their convs gain a bias.
    """
    tensors = [(name, t.shape) for name, t in model.root.state_tensors()]
    if not fold_bn:
        return tensors
    pairs = fold_pairs(model.root)
    dropped = {bn.path for _, bn in pairs}
    biased = {conv.path: conv.attrs["out"] for conv, _ in pairs if not conv.attrs["bias"]}
    out = []
    for name, shape in tensors:
        owner = name.rsplit(".", 1)[0]
        if owner in dropped:
            continue
        out.append((name, shape))
        if owner in biased and name.endswith(".weight"):
            out.append((f"{owner}.bias", (biased[owner],)))
    return out


SPEC = "spec"  # the format a model's `precision` section states (`bytes(spec)`, `format: spec`)


def spec_format(model: Model, **options) -> WeightFormat:
    """The format of the model's `precision` section: its default, and its layer-path patterns as
    overrides of those layers' tensors (`fc` -> `fc.*`)."""
    p = model.definition.precision
    if p is None:
        raise ValueError(f"model `{model.name}` has no `precision` section")
    rules = [(f"{r.pattern}.*", r.format) for r in p.rules] + list(options.pop("overrides", ()))
    return parse_format(p.default, overrides=rules, **options)


def model_format(model: Model, fmt: str | WeightFormat) -> WeightFormat:
    return spec_format(model) if fmt == SPEC else as_format(fmt)


def model_layout(model: Model, fmt: str | WeightFormat) -> Layout:
    fmt = model_format(model, fmt)
    return layout(weight_tensors(model, fmt.fold_bn), fmt)


def file_metadata(model: Model, fmt: str | WeightFormat) -> dict[str, str]:
    fmt = model_format(model, fmt)
    folded = [bn.path for _, bn in fold_pairs(model.root)] if fmt.fold_bn else []
    return metadata(fmt=fmt, model=model.name, spec_source=model.source, syntax=model.syntax,
                    params=model.params, input_shape=model.input_shape, folded=folded)


def predicted_bytes(model: Model, fmt: str | WeightFormat) -> int:
    """Exact size of the model file the runtime writes in format `fmt` (`spec`: the model's precision)."""
    fmt = model_format(model, fmt)
    return file_bytes(model_layout(model, fmt).stored(), file_metadata(model, fmt))
