"""ONNX files of a model: the float graph (torch's exporter, the yardstick) and the `weights` form,
which ships the model file's own codes (written by compiler.onnxgraph, whose docstring says how).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from compiler import fileformat, onnxgraph
from compiler.onnxgraph import Preprocessing
from compiler.tree import Model

from ..files import atomic_path, atomic_write
from ..quant.codes import unpack_bits
from ..weights import ModelFile


def export_float(module: torch.nn.Module, input_shape: tuple, path: Path, opset: int,
                 metadata: dict[str, str] | None = None) -> None:
    """`module` as an ONNX graph with a dynamic batch (`images` -> `logits`) by torch's exporter,
    BatchNorm folded, written atomically."""
    import onnx

    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, *input_shape),), str(tmp), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        model = onnx.load(str(tmp))
        _annotate(model, metadata)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))


def _annotate(model, metadata: dict[str, str] | None) -> None:
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


class _FileValues:
    """A model file's tensors as the ONNX writer asks for them (compiler.onnxgraph.Values)."""

    def __init__(self, file: ModelFile):
        self.stored = file.stored
        self.ranges = file.stored.get(fileformat.RANGES)

    def codes(self, entry):
        stored = self.stored[entry.name]
        if entry.bits == 8:
            return stored.numpy()
        return unpack_bits(stored, entry.bits, fileformat.numel(entry.shape)).numpy()

    def rows(self, entry):
        return self.ranges[entry.rows[0]:entry.rows[1]].numpy()

    def floats(self, entry) -> bytes:
        return self.stored[entry.name].contiguous().view(torch.uint8).numpy().tobytes()


def export_weights(file: ModelFile, path: Path, model: Model | None = None, classes: list[str] | None = None,
                   pre: Preprocessing | None = None) -> int:
    """The `weights` form of model file `file` (of `model`, by default its embedded spec), written by
    compiler.onnxgraph and so exactly `onnxgraph.predicted_bytes` long; returns its size."""
    import onnx

    model = model or file.model()
    proto = onnxgraph.graph(model, file.format, _FileValues(file), classes, pre)
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    return path.stat().st_size


def sample_feed(session, input_shape: tuple, batch: int = 1) -> dict:
    """A random image batch of the type and layout the session's graph takes: float32 NCHW in [0, 1], or
    uint8 (NCHW or NHWC) where the graph scales them itself; a static batch size wins over `batch`."""
    inp = session.get_inputs()[0]
    dims = [d if isinstance(d, int) else batch for d in inp.shape]
    rng = np.random.default_rng(0)
    if inp.type == "tensor(uint8)":
        return {inp.name: rng.integers(0, 256, dims, dtype=np.uint8)}
    return {inp.name: rng.random(dims, dtype=np.float32)}


def ort_latency_ms(paths: list[Path], input_shape: tuple, rounds: int = 10, runs: int = 20,
                   batch: int = 1) -> list[float] | None:
    """Median milliseconds of one inference (of `batch` images) of each ONNX file in ONNX Runtime on the
    CPU, one thread, after session creation (where the `weights` form is expanded) and 3 warm-ups. The files take
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
    feeds = [sample_feed(s, input_shape, batch) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for session, x in zip(sessions, feeds):
        for _ in range(3):
            session.run(None, x)
    for _ in range(rounds):
        for session, x, spent in zip(sessions, feeds, times):
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, x)
                spent.append(time.perf_counter() - start)
    return [statistics.median(t) * 1000 for t in times]
