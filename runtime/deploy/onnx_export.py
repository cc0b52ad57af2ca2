"""ONNX files of a model: the float graph, and the `weights` form that ships the model file's codes.

The `weights` form keeps each quantized tensor as the file stores it, uint8 codes plus its (min,
max) rows, and expands it in the graph exactly as the file is decoded (runtime.quant.codes:
min + code / levels * (max - min), in that order of float operations). Those are plain operators
on constants, so ONNX Runtime folds them once when a session is created: the file is about the
model file's size and runs on the float export's kernels. (Written as DequantizeLinear instead,
ORT keeps the nodes for its QDQ fusions and dequantizes on every inference: 2-5x slower, measured
in bench/bench_deploy.py.) Codes of 2 to 4 bits ship packed, two to a byte, as ONNX's UINT4 (opset
21, which over opset 20 only adds the 4-bit types); 5 to 7 bits, which ONNX has no type for, take a
byte each.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from compiler import fileformat
from compiler.tree import Model

from ..quant.codes import unpack_bits
from ..weights import ModelFile


def describe(input_shape: tuple, classes: list[str] | None = None) -> dict[str, str]:
    """What a deployment needs to feed the graph and read its answer, as ONNX metadata (strings)."""
    meta = {"nccompile.input": "x".join(map(str, input_shape)),
            "nccompile.preprocessing": "RGB, resized to the input's HxW, scaled to [0, 1], float32 NCHW"}
    if classes is not None:
        meta["nccompile.classes"] = json.dumps(list(classes))
    return meta


def export_float(module: torch.nn.Module, input_shape: tuple, path: Path, opset: int, fold: bool = True,
                 metadata: dict[str, str] | None = None) -> None:
    """`module` as an ONNX graph with a dynamic batch (`images` -> `logits`), written atomically.
    `fold=False` keeps every state-dict tensor as an initializer under its own name."""
    import onnx

    def write(tmp: Path) -> None:
        _export(module, input_shape, tmp, opset, fold)
        model = onnx.load(str(tmp))
        _annotate(model, metadata)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))

    _atomic(path, write)


def _annotate(model, metadata: dict[str, str] | None) -> None:
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


UINT4_OPSET = 21  # the first opset with 4-bit tensors


def export_weights(module: torch.nn.Module, file: ModelFile, path: Path, opset: int,
                   metadata: dict[str, str] | None = None, model: Model | None = None) -> int:
    """The `weights` form of `file` (whose module is `module`, built from `model`: by default the file's
    embedded spec); returns how many tensors ship as codes. A file with codes of 4 bits or fewer is
    exported at opset 20 and declared 21."""
    import onnx

    model = model or file.model()
    shipped = 0
    formats = [file.format] + [fileformat.parse_format(f) for _, f in file.format.overrides]
    packed = any(f.quantized and f.bits <= 4 for f in formats)

    def write(tmp: Path) -> None:
        nonlocal shipped
        _export(module, model.input_shape, tmp, max(opset, 20) if packed else opset, fold=False)
        proto = onnx.load(str(tmp))
        shipped = _ship_codes(proto.graph, file, model)
        if packed:
            for entry in proto.opset_import:
                if entry.domain in ("", "ai.onnx"):
                    entry.version = max(entry.version, UINT4_OPSET)
            proto.ir_version = max(proto.ir_version, 10)
        _annotate(proto, metadata)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

    _atomic(path, write)
    return shipped


def _export(module, input_shape, path: Path, opset: int, fold: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, *input_shape),), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=fold, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        shutil.move(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _codes_tensor(codes: np.ndarray, bits: int, name: str):
    """uint8 codes as an initializer: UINT4, two to a byte (low nibble first), for 4 bits or fewer."""
    from onnx import TensorProto, helper, numpy_helper

    if bits > 4:
        return numpy_helper.from_array(codes, name)
    flat = codes.reshape(-1)
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    return helper.make_tensor(name, TensorProto.UINT4, codes.shape, (flat[0::2] | (flat[1::2] << 4)).tobytes(),
                              raw=True)


def _ship_codes(graph, file: ModelFile, model: Model) -> int:
    """Replace each initializer the file quantized by its codes and the nodes that decode them."""
    from onnx import TensorProto, helper, numpy_helper

    shapes = dict(fileformat.weight_tensors(model, file.format.fold_bn))
    lay = fileformat.layout([(k, tuple(shapes[k])) for k in file.stored if k != fileformat.RANGES], file.format)
    ranges = file.stored.get(fileformat.RANGES)
    entries = {e.name: e for e in lay.entries if e.rows is not None}
    keep, nodes, levels = [], [], {}
    for init in graph.initializer:
        e = entries.get(init.name)
        if e is None:
            keep.append(init)
            continue
        i = len(nodes) // 4
        stored = file.stored[e.name]
        codes = stored if e.bits == 8 else unpack_bits(stored, e.bits, fileformat.numel(e.shape)).reshape(e.shape)
        rows = ranges[e.rows[0]:e.rows[1]]
        lead = (-1,) + (1,) * (len(e.shape) - 1) if len(rows) > 1 else ()
        low, span = rows[:, 0], rows[:, 1] - rows[:, 0]  # float32, as grid_values computes them
        if e.bits not in levels:
            levels[e.bits] = f"nccompile.levels{e.bits}"
            keep.append(numpy_helper.from_array(np.array(2 ** e.bits - 1, np.float32), levels[e.bits]))
        keep += [_codes_tensor(codes.numpy().astype(np.uint8), e.bits, f"q{i}.codes"),
                 numpy_helper.from_array(span.numpy().reshape(lead), f"q{i}.span"),
                 numpy_helper.from_array(low.numpy().reshape(lead), f"q{i}.min")]
        nodes += [helper.make_node("Cast", [f"q{i}.codes"], [f"q{i}.f"], to=TensorProto.FLOAT),
                  helper.make_node("Div", [f"q{i}.f", levels[e.bits]], [f"q{i}.u"]),
                  helper.make_node("Mul", [f"q{i}.u", f"q{i}.span"], [f"q{i}.s"]),
                  helper.make_node("Add", [f"q{i}.min", f"q{i}.s"], [init.name])]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    return len(nodes) // 4


def ort_latency_ms(paths: list[Path], input_shape: tuple, rounds: int = 10, runs: int = 20) -> list[float] | None:
    """Median milliseconds of one batch-1 inference of each ONNX file in ONNX Runtime on the CPU, one
    thread, after session creation (where the `weights` form is expanded) and 3 warm-ups. The files take
    turns, `runs` inferences each per round, so a slower moment of the machine weighs on all of them
    alike. None without onnxruntime installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import statistics
    import time

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in paths]
    x = {"images": np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)}
    times: list[list[float]] = [[] for _ in sessions]
    for session in sessions:
        for _ in range(3):
            session.run(None, x)
    for _ in range(rounds):
        for session, spent in zip(sessions, times):
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, x)
                spent.append(time.perf_counter() - start)
    return [statistics.median(t) * 1000 for t in times]
