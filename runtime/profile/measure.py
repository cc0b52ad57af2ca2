"""Timing a compiled model on a latency target: ONNX Runtime on nccompile's own float graph (the
`weights` file's kernels, zero weights: the CPU kernels' time does not depend on the values) or on the
int8 QDQ file, or PyTorch eager.

Wall-clock times (whole models; PyTorch units): warm-up, then samples of k back-to-back runs each (k
chosen so a sample lasts about 2 ms, so timer resolution and one-off stalls weigh little), and the
median sample. ONNX Runtime units and in-model times: node times from ORT's profiler (_profiled), net
of the profiler's own floor, measured in the same runs.
"""
from __future__ import annotations

import functools
import math
import re
import statistics
import time

import numpy as np

from compiler.latency import SMALL_UNIT_INPUTS

SAMPLE_S = 0.002


def _runs_per_sample(call, warmup: int, *others) -> int:
    """After `warmup` calls of `call` (and of `others`), how many back-to-back runs make a sample."""
    for _ in range(warmup):
        call()
        for other in others:
            other()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, int(SAMPLE_S / once)))


def median_ms(call, samples: int, warmup: int = 10) -> float:
    k = _runs_per_sample(call, warmup)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(k):
            call()
        times.append((time.perf_counter() - start) / k)
    return statistics.median(times) * 1000


def paired_ms(call, base, samples: int, warmup: int = 10) -> tuple[float, float]:
    """(median of call's sample, median of call's sample minus base's taken right before it): a unit's
    time with the empty graph's taken off, both timed at the same moments, so a slow spell of the
    machine slows both alike instead of landing on one of them."""
    k = _runs_per_sample(call, warmup, base)
    raw, net = [], []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(k):
            base()
        middle = time.perf_counter()
        for _ in range(k):
            call()
        end = time.perf_counter()
        raw.append((end - middle) / k)
        net.append((end - 2 * middle + start) / k)
    return statistics.median(raw) * 1000, statistics.median(net) * 1000


def _ort_graph(model, target: str, float_first: bool = True) -> bytes:
    """The ONNX graph `target` runs: nccompile's own float graph (zero weights: the CPU kernels' time
    does not depend on the values), or for ort-int8 the int8 QDQ file `format: int8` writes (ORT's
    static quantization of the float export; its first conv in float unless `float_first` is off),
    calibrated on random images, kept per model for the process."""
    if target != "ort-int8":
        from compiler import onnxgraph

        return onnxgraph.graph(model, "fp32").SerializeToString()
    from compiler.emit import emit

    key = (emit(model), tuple(model.input_shape), float_first)  # the elaborated layers: a search space's
    if key not in _INT8:                                         # configurations share their spec's text
        import logging
        import tempfile
        from pathlib import Path

        import onnxruntime as ort

        import compiler

        from ..deploy.qdq import export_int8

        module = compiler.build_module(model).eval()
        images = [np.random.default_rng(0).random((2, *model.input_shape), dtype=np.float32)]
        ort.set_default_logger_severity(3)  # not its notes on one-unit graphs (unused initializers)
        logging.disable(logging.WARNING)  # nor its quantizer's (per-channel axes of 1-D weights)
        try:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "int8.onnx"
                export_int8(module, tuple(model.input_shape), images, path, float_first_conv=float_first)
                _INT8[key] = path.read_bytes()
        finally:
            logging.disable(logging.NOTSET)
    return _INT8[key]


_INT8: dict[tuple, bytes] = {}


def _ort_session(model, threads: int, batch: int, profile_prefix: str | None = None, target: str = "ort-fp32",
                 float_first: bool = True, floor_chains: bool = False):
    """An ONNX Runtime session on the graph `target` runs for `model` (_ort_graph), or with the profiler's
    floor chains beside it (_with_floor_chains), and its feed: a random input batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    graph = _ort_graph(model, target, float_first)
    session = ort.InferenceSession(_with_floor_chains(graph) if floor_chains else graph, opts,
                                   providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((batch, *model.input_shape), dtype=np.float32)
    feed = {session.get_inputs()[0].name: images}
    if floor_chains:
        feed.update({f"{FLOOR_PREFIX}{op}#0": np.ones((1, 1, 1, 1), dtype=np.float32) for op in FLOOR_CHAINS})
    return session, feed


def ort_timer(model, threads: int, batch: int, target: str = "ort-fp32", float_first: bool = True):
    """call() running `model` once in ONNX Runtime, as the deployed file runs (on int8 with its first conv
    in int8 too if not `float_first`: a unit as it runs after a model's float head)."""
    session, feed = _ort_session(model, threads, batch, target=target, float_first=float_first)
    return lambda: session.run(None, feed)


# glibc's malloc gives a freed block over its mmap threshold (128 KiB at first) back to the system, and the
# next such tensor faults its pages in again, zeroed: on a 2-core VM the student's first conv at 256 px (a
# 4 MB output) took 3.6-8.7 ms in 6 processes of 7, against 1.0-1.9 ms with the settings below.
# PyTorch's CPU tuning guide advises an allocator that reuses memory (jemalloc, tcmalloc); glibc does with
# these two settings, the same as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647.
KEEP_FREED = {-3: 32 << 20, -1: 2**31 - 1}  # mallopt's M_MMAP_THRESHOLD (glibc's largest), M_TRIM_THRESHOLD


@functools.cache
def keep_freed_memory() -> str:
    """Have glibc's malloc keep and reuse freed memory in this process (KEEP_FREED), as PyTorch models are
    timed; returns the allocator as a table records it (`settings`)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator as it is
        return "system"
    if all(mallopt(param, value) == 1 for param, value in KEEP_FREED.items()):
        return "glibc, freed memory kept (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647)"
    return "glibc"


def timing_settings(target: str) -> dict:
    """How `target` is timed beyond its library (latency.SETTINGS), applied to this process."""
    from compiler import latency

    wanted = latency.SETTINGS.get(latency.canonical_target(target), ())
    return {"allocator": keep_freed_memory()} if "allocator" in wanted else {}


# PyTorch's max pooling branches on the data: timed on one input again and again it ran 46 us on 32x32x32,
# the branch predictor having learnt that input, and 112 us on 2 inputs in turn, 144 on 4, 149 on 16 (so
# inside a model, whose other layers run between). Each call takes the next of this many inputs.
TORCH_INPUTS = 16
TORCH_INPUTS_BYTES = 256 << 20  # fewer inputs where 16 would take more memory than this


def torch_timer(model, threads: int, batch: int):
    import itertools

    import torch

    import compiler

    keep_freed_memory()
    torch.set_num_threads(threads)
    module = compiler.build_module(model).eval()
    count = max(2, min(TORCH_INPUTS, TORCH_INPUTS_BYTES // (4 * batch * math.prod(model.input_shape))))
    inputs = itertools.cycle([torch.rand(batch, *model.input_shape) for _ in range(count)])

    def call():
        with torch.inference_mode():
            module(next(inputs))

    return call


TIMERS = {"ort-fp32": ort_timer, "torch-fp32": torch_timer,
          "ort-int8": lambda model, threads, batch: ort_timer(model, threads, batch, "ort-int8")}
# targets whose unit entries are kernel times (the profiler's), without the runtime's step from one node to
# the next, which the profiler then measures apart; a PyTorch unit's time carries its module calls
KERNEL_TIMES = {"ort-fp32", "ort-int8"}
# targets whose convs run fast only on whole channel blocks (ort_channel_block): ORT's blocked float layout,
# and its int8 NHWC kernels (a depthwise conv at 64x64 takes 57 us on 16 channels, 131 on 24, 209 on 28)
BLOCKED_LAYOUT = {"ort-fp32", "ort-int8"}


def latency_ms(model, target: str, threads: int = 1, batch: int = 1, samples: int = 15) -> float:
    return median_ms(TIMERS[target](model, threads, batch), samples)


PROBE = "pwconv(8)"  # after a "float" unit: the int8 conv that makes ORT run the unit as a model runs it


def unit_spec(unit) -> str:
    """The one-unit spec the profiler times for `unit`: a "float" unit (int8's float head) with an int8
    conv after it, whose time unit_ms leaves out, since what runs before an int8 conv changes with it."""
    return unit.spec(PROBE if unit.variant == "float" else "")


# small units: timed by the clock, paired with the empty model, since the profiler's whole microseconds are
# most of their time (a BatchNorm on 8 values reads 0.3 or 1.0 us, as the profiler's floor falls; a conv on
# 1x4x7 reads 1.0 us alone and 0.0-0.7 in models; int8's 3x3 conv on 3x7x7 read 2.1 us in one profile and
# 0.0 in the next). Up to SMALL_UNIT_INPUTS input elements the empty model's copy of its input, a reorder
# into or out of ORT's blocked layout, and int8's (de)quantization and NHWC transposes at the unit's edges
# are tens of nanoseconds; the step before each node after the first is taken off. Not int8's float units
# (its head), whose int8 conv after them (PROBE) is no part of their time.
WALL_TIMED = {"ort-fp32", "ort-int8"}


def unit_ms(model, empty, target: str, threads: int = 1, batch: int = 1, samples: int = 15,
            variant: str = "", step_ms: float = 0.0) -> dict:
    """A one-unit model's time as a table entry's fields: `ms`, what the unit costs inside a model.
    ONNX Runtime: its kernels' time from the profiler (ort_kernel_ms; `variant` "float": int8's float
    head, its first conv left in float, all its nodes but the PROBE's); a small unit (WALL_TIMED,
    SMALL_UNIT_INPUTS; on int8 with every conv in int8), its time less the empty model's, paired, less
    `step_ms` per node after its first (the runtime's step between kernels, which a model pays per unit;
    its layout reorders and conversions are nodes too), and `clock: wall`.
    PyTorch: its time less the empty model's, paired (paired_ms), and `run_ms`, its time with the call."""
    if target in KERNEL_TIMES:
        if variant != "float":
            if target in WALL_TIMED and math.prod(model.input_shape) * batch <= SMALL_UNIT_INPUTS:
                nodes = len(ort_node_ms(model, threads, batch, target=target, float_first=False))
                _, net = paired_ms(ort_timer(model, threads, batch, target, float_first=False),
                                   ort_timer(empty, threads, batch, target), samples)
                return {"ms": max(0.0, net - step_ms * (nodes - 1)), "clock": "wall"}
            return {"ms": ort_kernel_ms(model, threads, batch, target)}
        # int8's float head: with the conversions into int8 and back, which every int8 model pays once
        probe = model.root.children[-1].path
        nodes = ort_node_ms(model, threads, batch, target=target, float_first=True)
        return {"ms": max(0.0, sum(ms for name, ms in nodes.items() if node_path(name) != probe))}
    raw, net = paired_ms(TIMERS[target](model, threads, batch), TIMERS[target](empty, threads, batch), samples)
    return {"ms": max(0.0, net), "run_ms": raw}


def round_ms(models: list, target: str, threads: int, batch: int, samples: int, probe=None,
             progress=None) -> list[tuple[float, float]]:
    """Each model's median once, the models taking turns, with `probe()` (steady.Steadiness.now) timed
    before the first and after each: (ms, the slower of the probes on either side of it; 0 without one)."""
    probe = probe or (lambda: 0.0)
    timers = [TIMERS[target](m, threads, batch) for m in models]
    out, before = [], probe()
    for call in timers:
        ms = median_ms(call, samples)
        after = probe()
        out.append((ms, max(before, after)))
        before = after
        if progress is not None:
            progress()
    return out


PROFILE_S = 0.04  # ORT's profiler: run a model this long (20 to 400 runs) for its node times
# nodes that move a tensor between layouts or number formats, which a unit alone pays at its edges and a
# model only where its layout or format changes: ORT's reorders into and out of its blocked (NCHWc) layout
# and the transposes of its NHWC int8 kernels (`_token_N` after their names), and int8's (de)quantization
ADDED = re.compile(r"^(ReorderInput|ReorderOutput|Transpose)(_token_\d+)?$")
CONVERSIONS = {"QuantizeLinear", "DequantizeLinear"}


FLOOR_CHAINS = {"Relu": 1, "Add": 2}  # op -> its inputs: chains of no-op nodes beside every profiled graph
FLOOR_NODES = 9  # ... of this many nodes each, on one value
FLOOR_PREFIX = "profiler_floor_"


def _with_floor_chains(graph: bytes) -> bytes:
    """The graph with a chain of FLOOR_NODES nodes on a value of its own beside it for each op of
    FLOOR_CHAINS: what ORT's profiler reports for a node of no work, measured in the very runs it
    profiles (_floors)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load_from_string(graph)
    for op, inputs in FLOOR_CHAINS.items():
        names = [f"{FLOOR_PREFIX}{op}#{i}" for i in range(FLOOR_NODES + 1)]
        proto.graph.node.extend(helper.make_node(op, [a] * inputs, [b], name=b) for a, b in zip(names, names[1:]))
        proto.graph.input.append(helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [1, 1, 1, 1]))
        proto.graph.output.append(helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, 1, 1, 1]))
    return proto.SerializeToString()


def _floors(ms: dict[str, float], inputs: dict[str, int], order: list[str]) -> dict[str, float]:
    """What ORT's profiler put on each node of `order` (its first reads the model's input), from the
    floor chains' times `ms`: the Relu chain's for a node of one input, plus the Add chain's extra for
    each input after the first. The profiler's timestamps, whole microseconds and the input sizes and
    shapes it records for every node put 3-7 us on each here (more on every input), more than a small
    layer's work; and the floor moves with the machine's spells (3.2 us in one, 6 in another).
    One floor for every node, the ReLU chain's in the same runs, put the int8 student's in-model times
    at 32 and 64 px at 1.2-1.8x the whole model's time less the empty model's; by inputs, 0.76-1.16x
    (median 0.97, nine profiles)."""
    chain = {op: [ms[f"{FLOOR_PREFIX}{op}#{i}"] for i in range(1, FLOOR_NODES + 1)] for op in FLOOR_CHAINS}
    one = statistics.fmean(chain["Relu"][1:])
    per_input = max(0.0, statistics.fmean(chain["Add"][1:]) - one)
    first = chain["Relu"][0] - one  # a node reading a graph input
    # never over what a node of the model reported in the same runs: in one int8 bench run 53 of 87 models
    # had units of negative time inside them; one profile read the chains at 3.4 us, the model's nodes at 2.0
    reported = [ms[name] - per_input * (inputs[name] - 1) for name in order[1:] if name in ms]
    one = max(0.0, min([one, *reported]))
    return {name: one + per_input * (inputs[name] - 1) + (first if i == 0 else 0.0) for i, name in enumerate(order)}


def _profiled(model, threads: int, batch: int, runs: int | None, target: str = "ort-fp32",
              float_first: bool = True) -> tuple[list[str], dict[str, float], dict[str, str], dict[str, float]]:
    """(the model's node names in execution order, each node's profiled duration in ms, each node's op
    type, the profiler's floor on each node in the same runs (_floors)): durations are the mean of the
    middle 80% of the runs after a warm-up (ORT's are whole microseconds, so a median would round)."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        session, feed = _ort_session(model, threads, batch, os.path.join(folder, "profile"), target, float_first,
                                     floor_chains=True)
        warmup = 3
        for _ in range(warmup):
            session.run(None, feed)
        if runs is None:
            start = time.perf_counter()
            session.run(None, feed)
            warmup += 1
            runs = max(20, min(400, int(PROFILE_S / max(time.perf_counter() - start, 1e-7))))
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    times: dict[str, list[int]] = {}
    ops: dict[str, str] = {}
    inputs: dict[str, int] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][:-len("_kernel_time")]
            times.setdefault(name, []).append(e["dur"])
            ops[name] = e.get("args", {}).get("op_name", "")
            inputs[name] = max(1, len(e.get("args", {}).get("input_type_shape", [])))
    out = {}
    for name, durations in times.items():
        kept = sorted(durations[warmup:] or durations)
        cut = len(kept) // 10
        out[name] = statistics.fmean(kept[cut:len(kept) - cut]) / 1000
    order = [name for name in times if not name.startswith(FLOOR_PREFIX)]
    return order, {name: out[name] for name in order}, {name: ops[name] for name in order}, _floors(out, inputs, order)


def ort_node_ms(model, threads: int, batch: int, runs: int | None = None, target: str = "ort-fp32",
                float_first: bool = True, conversions: bool = True) -> dict[str, float]:
    """Each node's kernel time (ms) inside the model from ONNX Runtime's profiler, net of the profiler's
    own floor on each node in the same runs (_floors). Node names are the graph's after ORT's fusions:
    ours (layer paths, `_nchwc` after for the blocked-layout kernels) or torch's exporter's for int8
    (`/scope/.../Op`), and ORT's own for what it adds (ADDED). `conversions=False` leaves out the nodes
    of CONVERSIONS."""
    order, ms, ops, floors = _profiled(model, threads, batch, runs, target, float_first)
    return {name: ms[name] - floors[name] for name in order if conversions or ops[name] not in CONVERSIONS}


def ort_kernel_ms(model, threads: int, batch: int, target: str = "ort-fp32") -> float:
    """A one-unit model's own kernel time in ONNX Runtime: its nodes' net times from the profiler, less
    the layout and format conversions at its edges (ADDED, CONVERSIONS) that a model pays only where
    its layout or format changes, and less the session's call, which a model pays once."""
    return _kernel_sum(ort_node_ms(model, threads, batch, target=target, float_first=False, conversions=False))


def _kernel_sum(nodes: dict[str, float]) -> float:
    """The nodes' net times but ORT's layout reorders (ADDED), which a model pays only where layouts change."""
    return max(0.0, sum(ms for name, ms in nodes.items() if not ADDED.match(name)))


def node_path(name: str) -> str:
    """The layer path a profiled node belongs to: our graph names nodes by path (ORT adds `_nchwc`, our
    writer `#n`); torch's exporter by module scopes, `/features/features.10/features.10.0/dw/Conv_token_2`
    for `features.10.0.dw`, `/layer1/layer1.0/layer1.0.0/body/body.0/Conv` for `layer1.0.0.body.0`."""
    if not name.startswith("/"):
        return name.removesuffix("_nchwc").split("#")[0]
    path, last = "", ""
    for scope in name.split("/")[1:-1]:  # a scope is named from its parent's: `body` then `body.0`
        path = path[:len(path) - len(last)] + scope if last and scope.startswith(last + ".") else \
            f"{path}.{scope}" if path else scope
        last = scope
    return path


def ort_channel_block() -> int:
    """The channel block of ONNX Runtime's blocked (NCHWc) layout on this CPU: 16 with AVX-512, else 8
    (MLAS's NCHWc block). Convs on a multiple of 4 channels run blocked, padded up to the block; the
    table's units are mostly whole blocks, so pruning rounds to it (a bench_latency finding). ORT's
    int8 depthwise kernels are fastest on the same multiples (BLOCKED_LAYOUT)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return 16 if " avx512f" in flags else 8
