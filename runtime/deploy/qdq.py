"""The int8 QDQ form: weights and activations in int8, by ONNX Runtime's own static quantization.

ONNX Runtime's tool does this well and is maintained beside the runtime that executes it, so we use
it instead of writing QuantizeLinear/DequantizeLinear pairs ourselves: per-channel int8 weights,
uint8 activations calibrated on training images, QDQ pairs that ORT's CPU provider fuses into integer
kernels (QLinearConv, QLinearMatMul, ...) when it loads the file. This replaces PyTorch's FX int8
path (torch.ao.quantization, announced for removal) for `integer_inference`.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from .onnx_export import export_float


def export_int8(module: torch.nn.Module, input_shape: tuple, calibration: list[np.ndarray], path: Path,
                metadata: dict[str, str] | None = None, opset: int = 17, float_first_conv: bool = True) -> None:
    """`module`'s float export, statically quantized to QDQ int8 with `calibration` batches (float32
    NCHW images as the graph takes them), written atomically. `float_first_conv` leaves the first
    convolution in float: on the cifar10-mini student it takes the int8 model from 2.2 points below
    the float one to within 0.3, for 1.2x the all-int8 latency at 32 px (BENCHMARKS.md)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": np.ascontiguousarray(b, np.float32)} for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent) as work:
        plain, prepared = Path(work) / "float.onnx", Path(work) / "prepared.onnx"
        export_float(module, input_shape, plain, opset, metadata=metadata)
        quant_pre_process(str(plain), str(prepared))  # shape inference and ORT's own graph clean-up
        exclude = _float_nodes(prepared, float_first_conv)
        quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        _finish(tmp, metadata)


def _float_nodes(path: Path, first_conv: bool) -> list[str]:
    """The nodes the int8 file keeps in float: the first conv if asked, and every BatchNorm left unfolded
    (one that follows no conv, as in densenet). ORT has no int8 BatchNorm: quantized, its parameters
    are dequantized on every call (248 DequantizeLinear nodes in densenet121, 8-9% of its time)."""
    import onnx

    nodes = onnx.load(str(path)).graph.node  # in topological order
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    return convs[:1] * first_conv + [n.name for n in nodes if n.op_type == "BatchNormalization"]


def _finish(path: Path, metadata: dict[str, str] | None) -> None:
    import onnx

    model = onnx.load(str(path))
    pool_before_activation(model.graph)
    have = {p.key for p in model.metadata_props}
    for key, value in (metadata or {}).items():
        if key not in have:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(path))


ACTIVATIONS = ("Relu", "Clip")  # monotone: they commute with max pooling


def pool_before_activation(graph) -> int:
    """Swap each float `Relu`/`Clip` -> `MaxPool` pair into `MaxPool` -> activation; returns how many.

    Exact (a monotone function commutes with max), and it keeps the pool in float: ONNX Runtime moves
    a Q backward across a MaxPool and then runs that pool on uint8 in plain NCHW, 35x slower than its
    float pool (the student's first pool at 128 px: 751 us against 21 us; BENCHMARKS.md). With the
    activation between the pool and the Q, the Q stops there, and ORT folds the activation into it."""
    nodes = list(graph.node)
    producer = {out: n for n in nodes for out in n.output}
    uses = Counter(name for n in nodes for name in n.input)
    outputs = {o.name for o in graph.output}
    swapped = 0
    for pool in [n for n in nodes if n.op_type == "MaxPool" and len(n.output) == 1]:
        act = producer.get(pool.input[0])
        if act is None or act.op_type not in ACTIVATIONS or uses[act.output[0]] != 1 or act.output[0] in outputs:
            continue
        source, middle, result = act.input[0], act.output[0], pool.output[0]
        pooled = f"{result}_before_{act.op_type}"  # new: shape inference recorded `middle` at the unpooled size
        pool.input[0], pool.output[0] = source, pooled
        act.input[0], act.output[0] = pooled, result
        stale = [v for v in graph.value_info if v.name == middle]
        for v in stale:
            graph.value_info.remove(v)
        i, j = nodes.index(act), nodes.index(pool)  # the pool now runs first: keep topological order
        nodes[i], nodes[j] = pool, act
        swapped += 1
    if swapped:
        del graph.node[:]
        graph.node.extend(nodes)
    return swapped


def integer_ops(ops: Counter) -> int:
    """How many nodes of a fused graph compute in integers (QLinearConv, QGemm, ConvInteger, ...)."""
    return sum(n for op, n in ops.items() if op.startswith("QLinear") or op == "QGemm" or op.endswith("Integer"))


def fused_ops(path: Path) -> tuple[Counter, list[str]]:
    """The op types of the graph ONNX Runtime runs after its fusions (CPU provider, all optimizations),
    and the module paths of the convs and gemms left in floating point (their weights are not
    dequantized from int8: QDQ left them out)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # not the warning that the saved graph is specific to this machine
        opts.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    floating = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] not in dequantized]
    # torch's exporter names nodes /features/features.0/Conv: the module path is the last scope
    return ops, [name.split("/")[-2] if name.count("/") >= 2 else name for name in floating]
