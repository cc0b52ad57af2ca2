"""The deployed ONNX file of a model, written from its elaborated tree without torch.

One writer makes both the file the export step ships (runtime.deploy fills in the model file's
values) and its predicted size (zeros of the same types and shapes: protobuf stores tensor data as
length-prefixed bytes, so values never change the size). Each op writes its own nodes
(`OpRecord.onnx`, called with this writer); containers are written here.

The weights are the model file's, as it stores them. A quantized tensor ships as its codes (uint8,
or UINT4 two to a byte for 4 bits or fewer, opset 21) plus its (min, span) rows, and is decoded in
the graph as the file is (runtime.quant.codes: min + code / levels * span). Those are operators on
constants, so ONNX Runtime folds them once when a session is created: the file is about the model
file's size and runs on the float graph's kernels. (DequantizeLinear instead is kept by ORT for its
QDQ fusions and runs on every inference: 1.4-7x slower, bench/bench_deploy.py.) F16/BF16 tensors ship
as such behind a Cast.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from . import fileformat
from .errors import ExportError
from .fileformat import Entry, WeightFormat
from .ops import OPS
from .tree import Model, Node

OPSET = 17         # LayerNormalization's first opset
UINT4_OPSET = 21   # the first with 4-bit tensors
IR_VERSION = {17: 8, 21: 10}
PRODUCER = "nccompile"
INPUT, OUTPUT = "images", "logits"
LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class Preprocessing:
    """What the graph takes: float32 NCHW in [0, 1], or uint8 images in `layout`, scaled inside the
    graph; either way `mean`/`std` (the recipe's `normalize`, one value or one per channel) are applied
    inside. `fixed_batch`: a static batch of that size instead of a dynamic one."""

    uint8: bool = False
    layout: str = "nchw"
    fixed_batch: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class Values(Protocol):
    """Where the writer gets a model file's tensors (runtime.deploy reads them from the file)."""

    def codes(self, entry: Entry):  # uint8 array of entry.shape, unpacked
        ...

    def rows(self, entry: Entry):  # float32 array [rows, 2]: (min, max)
        ...

    def floats(self, entry: Entry) -> bytes:  # the stored tensor's raw little-endian bytes
        ...


_ONNX_DTYPES = {"F32": 1, "F16": 10, "BF16": 16, "U8": 2, "UINT4": 21, "I64": 7}  # TensorProto enum
_NUMPY = {"F32": "<f4", "I64": "<i8"}


def describe(input_shape: tuple, classes: list[str] | None = None, pre: Preprocessing | None = None,
             fmt: str | None = None, normalized_outside: tuple | None = None) -> dict[str, str]:
    """What a deployment needs to feed the graph and read its answer, as ONNX metadata (strings).
    `normalized_outside`: (mean, std) the caller must apply, for graphs that do not normalize."""
    c, h, w = input_shape if len(input_shape) == 3 else (*input_shape, None, None)[:3]
    pre = pre or Preprocessing()
    if pre.uint8:
        order = "NHWC" if pre.layout == "nhwc" else "NCHW"
        feed = f"RGB, resized to {h}x{w}, uint8 {order} (scaling is in the graph)"
        shape = (h, w, c) if pre.layout == "nhwc" else tuple(input_shape)
    else:
        feed, shape = "RGB, resized to the input's HxW, scaled to [0, 1], float32 NCHW", tuple(input_shape)
    if normalized_outside is not None:
        mean, std = normalized_outside
        feed += f", then normalized: (x - {list(mean)}) / {list(std)}"
    meta = {"nccompile.input": "x".join(map(str, shape)), "nccompile.preprocessing": feed}
    if pre.mean is not None:  # the graph normalizes, after its scaling
        meta["nccompile.normalize"] = json.dumps({"mean": list(pre.mean), "std": list(pre.std)})
    if fmt is not None:
        meta["nccompile.format"] = fmt
    if classes is not None:
        meta["nccompile.classes"] = json.dumps(list(classes))
    return meta


class GraphWriter:
    """Collects nodes and initializers; the op records call `node`, `weight`, `has`, `const`, `folded`."""

    def __init__(self, model: Model, fmt: WeightFormat, values: Values | None):
        import onnx  # a dependency of the package; imported here so that analysis without onnx budgets skips it

        self.onnx = onnx
        self.values = values
        self.nodes: list = []
        self.inits: list = []
        self.layer: Node | None = None
        self._names: set[str] = set()
        self._consts: dict = {}
        self.folded_bns = {bn.path for _, bn in fileformat.fold_pairs(model.root)} if fmt.fold_bn else set()
        tensors = fileformat.weight_tensors(model, fmt.fold_bn)
        lay = fileformat.layout(tensors, fmt)
        self.entries = {e.name: e for e in lay.entries}
        self.packed = any(e.bits is not None and e.bits <= 4 for e in lay.entries)
        self._quantized = 0  # tensors shipped as codes so far: their internal names' numbers

    # --- what op records call -------------------------------------------------------------
    def node(self, op_type: str, inputs: list[str], **attrs) -> str:
        """Appends one node of the current layer; returns its output's name."""
        base = self.layer.path if self.layer is not None and self.layer.path else op_type
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}#{i}"
        self._names.add(name)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def full(self, local: str) -> str:
        return f"{self.layer.path}.{local}" if self.layer.path else local

    def has(self, local: str) -> bool:
        return self.full(local) in self.entries

    def folded(self) -> bool:
        """Whether the current layer (a BatchNorm) is folded into the conv before it."""
        return self.layer.path in self.folded_bns

    def weight(self, local: str) -> str:
        """The current layer's state tensor `local` as a float value: an initializer, or its codes decoded."""
        e = self.entries[self.full(local)]
        if e.bits is None:
            return self._float(e)
        return self._decoded(e)

    def const(self, values, dtype: str = "F32", shape: tuple | None = None) -> str:
        """A shared constant (float32 or int64 values), named by its position among the constants."""
        values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
        shape = (len(values),) if shape is None else tuple(shape)
        key = (dtype, values, shape)
        if key not in self._consts:
            import numpy as np

            name = f"const{len(self._consts)}"
            data = np.asarray(values, _NUMPY[dtype]).reshape(shape)
            self.inits.append(self.onnx.numpy_helper.from_array(data, name))
            self._consts[key] = name
        return self._consts[key]

    # --- initializers -----------------------------------------------------------------------
    def _tensor(self, name: str, dtype: str, shape: tuple, data: bytes | None):
        n = fileformat.numel(shape)
        size = (n + 1) // 2 if dtype == "UINT4" else n * {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}[dtype]
        raw = bytes(size) if data is None else data
        if len(raw) != size:
            raise ExportError(f"{name}: {len(raw)} bytes of data for {size}")
        self.inits.append(self.onnx.helper.make_tensor(name, _ONNX_DTYPES[dtype], list(shape), raw, raw=True))
        return name

    def _float(self, e: Entry) -> str:
        dtype = e.stored.dtype
        data = None if self.values is None else self.values.floats(e)
        if dtype == "F32":
            return self._tensor(e.name, "F32", e.shape, data)
        stored = self._tensor(f"{e.name}.{dtype.lower()}", dtype, e.shape, data)
        self.nodes.append(self.onnx.helper.make_node("Cast", [stored], [e.name], to=1))
        return e.name

    def _decoded(self, e: Entry) -> str:
        import numpy as np

        h = self.onnx.helper
        packed = e.bits <= 4
        if self.values is None:
            codes = None
            rows = np.zeros((e.rows[1] - e.rows[0], 2), np.float32)
        else:
            codes = np.ascontiguousarray(self.values.codes(e), np.uint8).reshape(-1)
            rows = np.asarray(self.values.rows(e), np.float32)
            if packed:
                if len(codes) % 2:
                    codes = np.append(codes, np.uint8(0))
                codes = codes[0::2] | (codes[1::2] << 4)  # UINT4: the low nibble first
            codes = codes.tobytes()
        lead = (-1,) + (1,) * (len(e.shape) - 1) if len(rows) > 1 else ()
        low, span = rows[:, 0], rows[:, 1] - rows[:, 0]  # float32, as grid_values computes them
        levels = self.const(float(2 ** e.bits - 1), shape=())  # one constant per bit width
        # short internal names: every byte counts against the budget; the decoded value keeps the tensor's name
        q = f"q{self._quantized}"
        self._quantized += 1
        codes_name = self._tensor(f"{q}c", "UINT4" if packed else "U8", e.shape, codes)
        span_name = self._array(f"{q}s", span.reshape(lead))
        min_name = self._array(f"{q}m", low.reshape(lead))
        self.nodes += [h.make_node("Cast", [codes_name], [f"{q}f"], to=1),
                       h.make_node("Div", [f"{q}f", levels], [f"{q}u"]),
                       h.make_node("Mul", [f"{q}u", span_name], [f"{q}v"]),
                       h.make_node("Add", [min_name, f"{q}v"], [e.name])]
        return e.name

    def _array(self, name: str, data) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(data, name))
        return name

    # --- the tree ---------------------------------------------------------------------------
    def write(self, node: Node, x: str) -> str:
        if node.op == "seq":
            for child in node.children:
                x = self.write(child, x)
            return x
        if node.op == "residual":
            parts = {c.name: c for c in node.children}
            short = self.write(parts["shortcut"], x) if "shortcut" in parts else x
            body = self.write(parts["body"], x)
            self.layer = node
            return self.node("Add", [body, short])
        if node.op == "join":
            return self._join(node, x)
        record = OPS.get(node.op)
        if record is None or record.onnx is None:
            raise ExportError(f"{node.path or node.name}: `{node.op}` has no ONNX form in nccompile's writer; "
                              "export the model with `format: float` (torch's exporter) instead")
        self.layer = node
        return record.onnx(self, node.attrs, x)

    def _join(self, node: Node, x: str) -> str:
        split = node.attrs.get("split")
        self.layer = node
        if split:
            parts = [f"{node.path}.part{i}" for i in range(len(split))]
            self.nodes.append(self.onnx.helper.make_node("Split", [x, self.const(split, "I64")], parts,
                                                         name=f"{node.path}.split", axis=1))
        outs = [self.write(c, parts[i] if split else x) for i, c in enumerate(node.children)]
        self.layer = node
        if node.attrs["mode"] == "concat":
            return self.node("Concat", outs, axis=1)
        result = outs[0]
        for o in outs[1:]:
            result = self.node("Add" if node.attrs["mode"] == "add" else "Mul", [result, o])
        return result


def _preprocess(g: GraphWriter, pre: Preprocessing) -> str:
    g.layer = None
    x = INPUT
    if pre.uint8:
        x = g.node("Cast", [INPUT], to=1)
        if pre.layout == "nhwc":
            x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
        x = g.node("Div", [x, g.const(255.0, shape=())])
    if pre.mean is not None:
        per_channel = (1, len(pre.mean), 1, 1)
        x = g.node("Sub", [x, g.const(list(pre.mean), shape=per_channel)])
        x = g.node("Div", [x, g.const(list(pre.std), shape=(1, len(pre.std), 1, 1))])
    return x


def graph(model: Model, fmt: WeightFormat | str, values: Values | None = None, classes: list[str] | None = None,
          pre: Preprocessing | None = None):
    """The ONNX ModelProto of `model` with weights in format `fmt` (zeros without `values`)."""
    from onnx import helper as h

    fmt = fileformat.model_format(model, fmt)
    pre = pre or Preprocessing()
    if pre.layout not in LAYOUTS:
        raise ExportError(f"unknown image layout {pre.layout!r}; expected one of {', '.join(LAYOUTS)}")
    g = GraphWriter(model, fmt, values)
    x = g.write(model.root, _preprocess(g, pre))
    if x == INPUT:  # a model without any node
        g.layer = None
        x = g.node("Identity", [x])
    for n in reversed(g.nodes):  # its last node writes the output under its public name
        if x in n.output:
            n.output[list(n.output).index(x)] = OUTPUT
            break
    batch = pre.fixed_batch if pre.fixed_batch is not None else "batch"
    shape = tuple(model.input_shape)
    if pre.uint8 and pre.layout == "nhwc":
        shape = (shape[1], shape[2], shape[0])
    inp = h.make_tensor_value_info(INPUT, 2 if pre.uint8 else 1, [batch, *shape])
    out = h.make_tensor_value_info(OUTPUT, 1, [batch, *model.root.out_shape])
    opset = UINT4_OPSET if g.packed else OPSET
    proto = h.make_model(h.make_graph(g.nodes, model.name, [inp], [out], g.inits),
                         opset_imports=[h.make_opsetid("", opset)], producer_name=PRODUCER,
                         ir_version=IR_VERSION[opset])
    meta = describe(model.input_shape, classes, pre, fmt.name)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def predicted_bytes(model: Model, fmt: WeightFormat | str, classes: list[str] | None = None,
                    pre: Preprocessing | None = None) -> int:
    """Exact size of the ONNX file the export step writes (`format: weights`) for weight format `fmt`."""
    return graph(model, fmt, None, classes, pre).ByteSize()

