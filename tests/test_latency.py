"""Latency budgets: units from the spec (torch-free), tables from `nccompile profile`, prediction, refusal."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import compiler
from compiler import latency
from compiler.errors import SpecError
from runtime.cli import main

from .conftest import ROOT

TINY = """model tiny(width: int = 8) {
    input 3x16x16
    budget latency(ort-fp32) <= LIMIT
    conv(width) bn relu maxpool(2)
    residual { conv(width) bn relu }
    gap flatten
    head: linear(10)
}
"""


def _tiny(tmp_path, limit="50ms", name="tiny.spec"):
    path = tmp_path / name
    path.write_text(TINY.replace("LIMIT", limit))
    return path


def _table(tmp_path, model, ms_of, fit=None, drop=()):
    """A table for this machine whose entries are `ms_of(unit)`; `drop`: keys left out."""
    table = latency.Table(tmp_path / "tables" / "ort-fp32.json", "ort-fp32", 1, 1, latency.machine(),
                          {"onnxruntime": latency.library_version("ort-fp32")},
                          fit or {"overhead_ms": 0.0, "scale": 1.0})
    for u in latency.units(model):
        if u.key not in drop:
            table.entries[u.key] = {"ms": ms_of(u), "macs": u.macs, "moved": u.moved, "structure": u.structure}
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text(json.dumps(table.to_json()))
    return table


@pytest.fixture
def tables(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCOMPILE_LATENCY_DIR", str(tmp_path / "tables"))
    return tmp_path / "tables"


@pytest.mark.parametrize("spec", ["specs/student.spec", *sorted(str(p.relative_to(ROOT))
                                                               for p in (ROOT / "specs" / "zoo").glob("*.spec"))])
def test_every_unit_compiles_alone_with_its_macs_and_every_layer_is_in_one_unit(spec):
    model = compiler.compile_spec(ROOT / spec)
    units = latency.units(model)
    assert sum(u.macs for u in units) == model.root.total_macs
    covered = [p for u in units for p in u.paths]
    leaves = [n.path for n in model.root.leaves() if n.op != "seq"]  # an empty branch is no layer
    assert set(leaves) <= set(covered) and len(covered) == len(set(covered))
    for u in {u.key: u for u in units}.values():
        alone = compiler.compile_source(u.spec(), "unit")
        assert alone.root.total_macs == u.macs, u.key


def test_a_conv_takes_in_its_batchnorm_and_activation_as_ort_fuses_them():
    model = compiler.compile_source("model m { input 3x8x8 conv(4) bn relu6 relu maxpool(2) gap flatten "
                                    "linear(10) relu dropout(0.1) }", "m.spec")
    texts = [u.text.split("(")[0] + "|" + str(len(u.paths)) for u in latency.units(model)]
    assert texts == ["conv|3", "relu|1", "maxpool|1", "gap|1", "flatten|1", "linear|3"]


def test_a_conv_takes_in_the_batchnorm_of_a_block_after_it_as_the_flat_graph_fuses_them():
    model = compiler.compile_source("block norm() { bn(eps=0.001) }\nmodel m { input 3x8x8 conv(4) norm hardswish "
                                    "{ pwconv(8) norm } relu gap flatten linear(10) }", "m.spec")
    texts = [u.text.split("(")[0] + "|" + str(len(u.paths)) for u in latency.units(model)]
    assert texts == ["conv|3", "pwconv|3", "gap|1", "flatten|1", "linear|1"]


def test_latency_budgets_read_their_unit_in_the_dsl_and_in_yaml():
    m = compiler.compile_source(TINY.replace("LIMIT", "800us"), "t.spec")
    (b,) = m.definition.budgets
    assert (b.metric, b.format, b.unit, b.scale) == ("latency", "ort-fp32", "us", 0.001)
    y = compiler.compile_source("model:\n  name: m\n  input: [3, 8, 8]\n  budgets: {\"latency(torch-fp32)\": 2.5ms}\n"
                                "  layers: [{conv: [4]}, gap, flatten, {linear: [10]}]\n", "m.yaml", syntax="yaml")
    (b,) = y.definition.budgets
    assert (b.metric, b.format, b.unit) == ("latency", "torch-fp32", "ms")


@pytest.mark.parametrize("line, message", [
    ("budget latency(ort-fp33) <= 2ms", "t.spec:3:12: error: unknown latency target `ort-fp33`"),
    ("budget latency <= 2ms", "t.spec:3:12: error: a `latency` budget needs a target"),
    ("budget params <= 2ms", "t.spec:3:12: error: `params` is not a time"),
])
def test_a_bad_latency_budget_is_a_located_error(line, message):
    with pytest.raises(SpecError) as err:
        compiler.compile_source(TINY.replace("budget latency(ort-fp32) <= LIMIT", line), "t.spec")
    assert message in str(err.value)


def test_without_a_table_a_latency_budget_says_how_to_make_one(tmp_path, tables, capsys):
    assert main([str(_tiny(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "no latency table for ort-fp32" in err and "nccompile profile --target ort-fp32" in err
    assert "Traceback" not in err


def test_prediction_is_overhead_plus_scale_times_the_units_and_the_budget_uses_it(tmp_path, tables, capsys):
    spec = _tiny(tmp_path, "50ms")
    model = compiler.compile_spec(spec)
    _table(tmp_path, model, lambda u: 0.001 * (1 + u.macs / 1e4),
           fit={"overhead_ms": 0.015, "overhead_ms_per_input": 0.005 / math.prod(model.input_shape), "scale": 0.9})
    expected = 0.02 + 0.9 * sum(0.001 * (1 + u.macs / 1e4) for u in latency.units(model))
    assert main([str(spec), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latency"]["ort-fp32"]["ms"] == pytest.approx(expected)
    assert report["budgets"][0]["value"] == pytest.approx(expected) and report["budgets"][0]["ok"]
    layers = {r["path"]: r.get("latency_ms") for r in report["layers"]}
    assert sum(v for p, v in layers.items() if "." not in p) == pytest.approx(expected - 0.02)


def test_a_broken_latency_budget_exits_1_with_its_predicted_value(tmp_path, tables, capsys):
    spec = _tiny(tmp_path, "500us")
    model = compiler.compile_spec(spec)
    _table(tmp_path, model, lambda u: 0.2)
    assert main([str(spec)]) == 1
    out = capsys.readouterr().out
    predicted = 0.2 * len(latency.units(model))
    assert f"FAIL  latency(ort-fp32) <= 0.5 ms: {predicted:.3f} ms" in out


def test_a_unit_missing_from_the_table_is_its_nearest_of_the_same_structure_scaled_by_macs(tmp_path):
    narrow = compiler.compile_spec(_tiny(tmp_path), params={"width": 8})
    wide = compiler.compile_spec(_tiny(tmp_path), params={"width": 12})
    table = _table(tmp_path, narrow, lambda u: 0.01)
    prediction = latency.predict(wide, table)
    for unit, ms, how in prediction.units:
        if unit.key in table.entries:
            assert how == "measured" and ms == 0.01
            continue
        source = how.removeprefix("nearest ")
        near = table.entries[source]
        assert near["structure"] == unit.structure
        ratio = unit.macs / near["macs"] if unit.macs else (unit.moved + 1) / (near["moved"] + 1)
        assert ms == pytest.approx(0.01 * ratio)
    assert prediction.estimated > 0


def test_a_table_from_another_machine_or_library_version_is_refused(tmp_path):
    model = compiler.compile_spec(_tiny(tmp_path))
    table = _table(tmp_path, model, lambda u: 0.01)
    raw = json.loads(table.path.read_text())
    for field, value, said in [("machine", {"cpu": "Imaginary CPU", "cores": 64}, "another machine"),
                               ("libraries", {"onnxruntime": "0.1.0"}, "onnxruntime 0.1.0"),
                               ("target", "torch-fp32", "measured for torch-fp32")]:
        table.path.write_text(json.dumps({**raw, field: value}))
        with pytest.raises(latency.LatencyError, match=said):
            latency.load_table("ort-fp32", table.path)


def test_a_torch_table_without_its_allocator_is_refused(tmp_path):
    """PyTorch's times depend on whether glibc keeps freed memory (4x on a large conv): a torch-fp32
    table records it, and one made before it was recorded is measured again."""
    model = compiler.compile_spec(_tiny(tmp_path))
    raw = json.loads(_table(tmp_path, model, lambda u: 0.01).path.read_text())
    path = tmp_path / "torch-fp32.json"
    torch_raw = {**raw, "target": "torch-fp32", "libraries": {"torch": latency.library_version("torch-fp32")}}
    path.write_text(json.dumps({k: v for k, v in torch_raw.items() if k != "settings"}))
    with pytest.raises(latency.LatencyError, match="before nccompile recorded its allocator"):
        latency.load_table("torch-fp32", path)
    path.write_text(json.dumps({**torch_raw, "settings": {"allocator": "glibc"}}))
    assert latency.load_table("torch-fp32", path).settings == {"allocator": "glibc"}
    assert latency.load_table("ort-fp32", tmp_path / "tables" / "ort-fp32.json").settings == {}


KEEP_FREED_PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from runtime.profile.measure import keep_freed_memory
    print(keep_freed_memory())
torch.set_num_threads(1)
w, x = torch.rand(16, 3, 3, 3), torch.rand(1, 3, 256, 256)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        for _ in range(20):
            torch.nn.functional.conv2d(x, w, padding=1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_torch_is_timed_with_freed_memory_kept(in_root):
    """The conv's 4 MB output (and oneDNN's scratch) faults in afresh on every call with glibc's defaults;
    with the profiler's setting the pages are reused."""
    def probe(how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, how], capture_output=True, text=True,
                              timeout=120)

    keep = probe("keep")
    assert keep.returncode == 0, keep.stderr
    said, kept = keep.stdout.split("\n")[:2]
    if said.startswith("glibc, freed memory kept"):  # on failure, the faults with glibc's defaults beside
        assert int(kept) < 100, (int(kept), probe("default").stdout)
    else:  # another C library: recorded as it is
        assert said in ("system", "glibc")


def test_pytorch_is_timed_on_inputs_that_change_from_call_to_call():
    """PyTorch's max pooling branches on its data: on one input again and again the branch predictor learns
    it (46 us on 32x32x32 against 149 on 16 inputs in turn, the case inside a model), so each call takes
    the next of TORCH_INPUTS inputs, fewer where they would take too much memory."""
    import torch

    from runtime.profile import measure

    model = compiler.compile_source("model m { input 4x8x8 maxpool(2) }", "m.spec")
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(args[0].sum().item()) if isinstance(module, torch.nn.MaxPool2d) else None)
    try:
        call = measure.torch_timer(model, threads=1, batch=1)
        for _ in range(2 * measure.TORCH_INPUTS):
            call()
    finally:
        hook.remove()
    first = seen[:measure.TORCH_INPUTS]
    assert len(set(first)) == measure.TORCH_INPUTS and seen[measure.TORCH_INPUTS:] == first
    big = compiler.compile_source("model m { input 3x2048x2048 maxpool(2) }", "m.spec")  # 48 MiB an input
    inputs = measure.TORCH_INPUTS_BYTES // (4 * 3 * 2048 * 2048)
    assert 2 <= inputs < measure.TORCH_INPUTS
    seen.clear()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(args[0].data_ptr()) if isinstance(module, torch.nn.MaxPool2d) else None)
    try:
        call = measure.torch_timer(big, threads=1, batch=1)
        for _ in range(inputs + 1):
            call()
    finally:
        hook.remove()
    assert len(set(seen)) == inputs and seen[-1] == seen[0]


def test_the_fit_takes_the_overhead_from_the_empty_models_and_recovers_its_terms():
    from runtime.profile import fit

    def point(s, n, inputs, moved=0):  # 0.01 ms + 2 ns per input element, 1 us per unit, 0.8 x its units
        empty = 0.01 + 2e-6 * inputs
        return {"sum_ms": s, "units": n, "inputs": inputs, "empty_ms": empty, "moved": moved,
                "measured_ms": empty + 0.001 * n + 0.8 * s}

    # a measured per-unit term (ORT's step between kernels) is taken as it is; the scale is fitted
    shapes = [(0.1, 5, 3072), (0.5, 30, 12288), (2.0, 12, 150528), (7.0, 80, 150528), (0.3, 9, 3072)]
    f = fit({str(i): point(*shape) for i, shape in enumerate(shapes)}, 0.001)
    assert (f["overhead_ms"], f["overhead_ms_per_input"]) == pytest.approx((0.01, 2e-6))
    assert (f["per_unit_ms"], f["scale"]) == pytest.approx((0.001, 0.8))
    # without one (PyTorch, whose entries carry their module calls) the second term is per element moved:
    # 0.2 ms per million elements, 0.8 x the units, nothing per unit
    models = {}
    for i, (s, n, inputs) in enumerate(shapes):
        moved = int(3e5 * s + 4e4 * (i % 3))  # not in proportion to the sum
        models[str(i)] = {**point(s, 0, inputs, moved), "units": n}
        models[str(i)]["measured_ms"] += 2e-7 * moved
    f = fit(models)
    assert (f["per_moved_ms"], f["scale"], f["per_unit_ms"]) == pytest.approx((2e-7, 0.8, 0.0))
    # one input size: the overhead is its empty model's time
    f = fit({str(s): point(s, 4, 3072) for s in (0.1, 1.0)})
    assert f["overhead_ms"] == pytest.approx(0.01 + 2e-6 * 3072) and f["overhead_ms_per_input"] == 0.0
    # the overhead and its slope never go negative
    f = fit({"a": {**point(1.0, 4, 100), "empty_ms": 0.02}, "b": {**point(1.0, 4, 1000), "empty_ms": 0.01}})
    assert f["overhead_ms"] >= 0 and f["overhead_ms_per_input"] >= 0 and f["scale"] > 0


def test_a_pytorch_table_adds_its_cost_per_element_moved(tmp_path):
    model = compiler.compile_spec(_tiny(tmp_path))
    fit = {"overhead_ms": 0.01, "per_unit_ms": 0.0, "scale": 1.1, "per_moved_ms": 3e-7}
    table = _table(tmp_path, model, lambda u: 0.004, fit=fit)
    units = latency.units(model)
    expected = 0.01 + 1.1 * 0.004 * len(units) + 3e-7 * sum(u.moved for u in units)
    assert latency.predict(model, table).ms == pytest.approx(expected)
    assert sum(u.moved for u in units) > 1000  # the term counts here


def test_units_timed_alone_and_inside_models_get_fitted_terms_of_their_own():
    """Each model's units timed inside models (sum_ms) and alone (alone_ms) are two instruments: with the
    step between kernels measured, each gets its own per-unit term and scale, fitted on the same models."""
    from runtime.profile import fit

    step, empty = 0.0002, 0.005
    models = {}
    for i, (net, n) in enumerate([(0.05, 5), (0.4, 30), (2.0, 12), (7.0, 80), (0.3, 9), (1.2, 60)]):
        # in a model: 0.9 x its units' in-model times - 0.2 us each; alone: 1.1 x their times - 0.9 us each
        models[str(i)] = {"inputs": 3072, "empty_ms": empty, "units": n, "measured_ms": empty + step * n + net,
                          "sum_ms": (net + 0.0002 * n) / 0.9, "alone_ms": (net + 0.0009 * n) / 1.1}
    f = fit(models, step)
    assert f["per_unit_ms"] == step
    assert (f["in_model_per_unit_ms"], f["scale"]) == pytest.approx((-0.0002, 0.9))
    assert (f["alone_per_unit_ms"], f["alone_scale"]) == pytest.approx((-0.0009, 1.1))
    # models of one shape cannot tell a per-unit term from the scale: the scale alone
    same = {k: {**c, "units": 10, "sum_ms": 1.0, "alone_ms": 1.0, "measured_ms": empty + step * 10 + 0.8}
            for k, c in models.items()}
    f = fit(same, step)
    assert (f["in_model_per_unit_ms"], f["scale"]) == pytest.approx((0.0, 0.8))
    # models measured before alone sums were kept: units alone take the in-model terms' scale
    f = fit({k: {x: v for x, v in c.items() if x != "alone_ms"} for k, c in models.items()}, step)
    assert (f["alone_per_unit_ms"], f["alone_scale"]) == (0.0, f["scale"])
    # without a measured step (PyTorch: every unit timed alone) one fit serves both
    f = fit({k: {**c, "sum_ms": c["alone_ms"]} for k, c in models.items()})
    assert (f["alone_per_unit_ms"], f["alone_scale"]) == (0.0, f["scale"])


def test_the_per_unit_terms_pass_small_units_by_where_that_fits():
    """A unit of up to SMALL_UNIT_INPUTS input elements works in the cache alone as in a model: the alone
    per-unit term is fitted on the larger units only; the in-model one on them where that fits the whole
    models better than on every unit."""
    from runtime.profile import fit

    step, empty = 0.0002, 0.005
    models = {}
    for i, (net, n, big) in enumerate([(0.05, 5, 1), (0.4, 30, 20), (2.0, 12, 12), (7.0, 80, 70), (0.3, 9, 2),
                                       (1.2, 60, 15)]):
        # in a model and alone: +0.5 us for each large unit, none for a small one
        models[str(i)] = {"inputs": 3072, "empty_ms": empty, "units": n, "units_above": big,
                          "measured_ms": empty + step * n + net, "sum_ms": net - 0.0005 * big,
                          "alone_ms": (net - 0.0005 * big) / 1.1}
    f = fit(models, step)
    assert f["in_model_per_unit_above"] == f["alone_per_unit_above"] == latency.SMALL_UNIT_INPUTS
    assert (f["in_model_per_unit_ms"], f["scale"]) == pytest.approx((0.0005, 1.0))
    assert (f["alone_per_unit_ms"], f["alone_scale"]) == pytest.approx((0.0005, 1.1))
    # the same per every unit: the in-model term reaches every unit, the alone one stays on the large
    every = {k: {**c, "sum_ms": c["measured_ms"] - empty - step * c["units"] - 0.0005 * c["units"]}
             for k, c in models.items()}
    f = fit(every, step)
    assert f["in_model_per_unit_above"] == 0
    assert (f["in_model_per_unit_ms"], f["scale"]) == pytest.approx((0.0005, 1.0))
    # a calibration from before units_above was kept: every unit, as then
    f = fit({k: {x: v for x, v in c.items() if x != "units_above"} for k, c in models.items()}, step)
    assert f["in_model_per_unit_above"] == f["alone_per_unit_above"] == 0


def test_on_ort_the_fit_takes_the_smallest_units_as_they_were_timed():
    """Units of up to RAW_UNIT_INPUTS input elements (`raw_ms`, alone `raw_alone_ms`) enter a prediction at
    their time: the fit takes them off and fits its scales and per-unit terms on the other units, all of
    them. A calibration from before the raw sums were kept fits every unit, as then."""
    from runtime.profile import fit

    step, empty = 0.0002, 0.005
    models = {}
    for i, (raw, n_raw, rest, n) in enumerate([(0.004, 4, 0.05, 5), (0.001, 2, 0.4, 30), (0.0, 0, 2.0, 12),
                                                (0.002, 3, 7.0, 80), (0.006, 8, 0.3, 9), (0.0005, 1, 1.2, 60)]):
        # the others: in a model 0.9 x their entries less 0.5 us a unit, alone 1.1 x less 0.8 us (what the
        # raw units alone, half their time in a model, miss goes to the fitted ones)
        others = 0.9 * rest - 0.0005 * n
        models[str(i)] = {"inputs": 3072, "empty_ms": empty, "units": n + n_raw, "units_above": n // 2,
                          "measured_ms": empty + step * (n + n_raw) + raw + others, "sum_ms": rest + raw,
                          "raw_ms": raw, "raw_units": n_raw, "raw_alone_ms": raw / 2,
                          "alone_ms": (others + raw / 2 + 0.0008 * n) / 1.1 + raw / 2}
    f = fit(models, step)
    assert f["raw_unit_inputs"] == f["in_model_per_unit_above"] == f["alone_per_unit_above"] == \
        latency.RAW_UNIT_INPUTS
    assert (f["in_model_per_unit_ms"], f["scale"]) == pytest.approx((-0.0005, 0.9))
    assert (f["alone_per_unit_ms"], f["alone_scale"]) == pytest.approx((-0.0008, 1.1))
    old = fit({k: {x: v for x, v in c.items() if not x.startswith("raw_")} for k, c in models.items()}, step)
    assert "raw_unit_inputs" not in old and old["scale"] != pytest.approx(0.9)


def test_prediction_takes_the_smallest_units_as_they_were_timed(tmp_path):
    """A fit with `raw_unit_inputs`: the units up to it enter at their entries, the step added; the fitted
    scales and per-unit terms reach the others only (prediction and by_path alike)."""
    model = compiler.compile_source("model m { input 3x16x16 conv(8, kernel=3) bn relu gap flatten linear(4) }",
                                    "m.spec")
    fit = {"overhead_ms": 0.01, "per_unit_ms": 0.0002, "scale": 0.9, "in_model_per_unit_ms": -0.0001,
           "in_model_per_unit_above": 0, "alone_scale": 1.2, "alone_per_unit_ms": -0.0005,
           "alone_per_unit_above": latency.RAW_UNIT_INPUTS, "raw_unit_inputs": latency.RAW_UNIT_INPUTS}
    table = _table(tmp_path, model, lambda u: 0.004, fit=fit)
    units = latency.units(model)
    small = [u for u in units if math.prod(u.in_shape) <= latency.RAW_UNIT_INPUTS]
    assert 0 < len(small) < len(units)
    prediction = latency.predict(model, table)
    large = len(units) - len(small)
    assert prediction.ms == pytest.approx(0.01 + 0.0002 * len(units) + 0.004 * len(small)
                                          + large * (1.2 * 0.004 - 0.0005))
    assert sum(prediction.by_path().values()) == pytest.approx(0.004 * len(small) + large * 1.2 * 0.004)


def test_a_smallest_unit_timed_by_the_clock_and_inside_models_enters_at_the_mean_of_the_two(tmp_path):
    """Two instruments of a tiny unit's cost that err either way (the profiler's whole microseconds inside
    models, a unit alone's edges): it enters at their mean. A larger unit, or one the profiler timed alone
    too, keeps its in-model time."""
    model = compiler.compile_source("model m { input 3x16x16 conv(8, kernel=3) bn relu gap flatten linear(4) }",
                                    "m.spec")
    table = _table(tmp_path, model, lambda u: 0.001)
    units = latency.units(model)
    small = next(u for u in units if math.prod(u.in_shape) <= latency.RAW_UNIT_INPUTS)
    large = next(u for u in units if math.prod(u.in_shape) > latency.RAW_UNIT_INPUTS)
    for unit in (small, large):
        table.entries[unit.key].update(clock="wall", ctx={"other@3x16x16": 0.003})
    table.touch()
    assert latency.entry_ms(small, table)[0] == pytest.approx(0.002)
    assert latency.entry_ms(large, table)[0] == pytest.approx(0.003)
    del table.entries[small.key]["clock"]  # the profiler's time alone: one instrument
    table.touch()
    assert latency.entry_ms(small, table)[0] == pytest.approx(0.003)


def test_the_sums_a_fit_needs_keep_the_smallest_units_apart_on_ort(tmp_path):
    from runtime.profile import unit_sums

    model = compiler.compile_source("model m { input 3x16x16 conv(8, kernel=3) bn relu gap flatten linear(4) }",
                                    "m.spec")
    table = _table(tmp_path, model, lambda u: 0.001 * math.prod(u.in_shape))
    units = latency.units(model)
    small = [u for u in units if math.prod(u.in_shape) <= latency.RAW_UNIT_INPUTS]
    sums = unit_sums(model, table)
    assert sums["units"] == len(units) and sums["raw_units"] == len(small)
    assert sums["raw_ms"] == sums["raw_alone_ms"] == pytest.approx(sum(0.001 * math.prod(u.in_shape) for u in small))
    assert sums["sum_ms"] == pytest.approx(sum(0.001 * math.prod(u.in_shape) for u in units))
    table.target = "torch-fp32"  # PyTorch's fit has no raw units (entries with their module calls)
    assert "raw_ms" not in unit_sums(model, table)


def test_a_pytorch_fit_scales_the_large_units_alone_where_that_fits_best():
    """On PyTorch a large unit alone runs slower than inside a model (its input not in the cache, max
    pooling's branches on smoother data) and a small one as inside: the scale for units alone reaches the
    units over the one of SCALE_ABOVE_CANDIDATES that fits the whole models best."""
    from runtime.profile import fit

    empty = 0.003
    models = {}
    for i, (small, big, moved) in enumerate([(0.02, 0.0, 500), (0.05, 0.4, 9e4), (0.3, 6.0, 2e6), (0.1, 12.0, 5e6),
                                             (0.01, 0.0, 100), (0.2, 2.5, 1e6)]):
        # units over 262,144 elements at 0.7x, the others as timed, 0.05 ms per million elements moved
        models[str(i)] = {"inputs": 3072, "empty_ms": empty, "units": 10, "moved": moved,
                          "measured_ms": empty + 0.7 * big + small + 5e-8 * moved, "sum_ms": small + big,
                          "sum_above_ms": {str(t): big if t and t <= 262_144 else 0.0 if t else small + big
                                           for t in latency.SCALE_ABOVE_CANDIDATES}}
    f = fit(models)
    assert f["alone_scale_above"] in (4_096, 16_384, 65_536, 262_144)
    assert (f["alone_scale"], f["per_moved_ms"]) == pytest.approx((0.7, 5e-8))
    # every unit scaled, as in a calibration from before the sums by size were kept: it cannot fit them all
    old = fit({k: {x: v for x, v in c.items() if x != "sum_above_ms"} for k, c in models.items()})
    assert old["alone_scale_above"] == 0 and old["alone_scale"] != pytest.approx(0.7)


def test_the_scale_for_units_alone_passes_the_units_below_its_threshold(tmp_path):
    model = compiler.compile_spec(_tiny(tmp_path))
    units = latency.units(model)
    sizes = sorted({math.prod(u.in_shape) for u in units})
    threshold = sizes[len(sizes) // 2]
    table = _table(tmp_path, model, lambda u: 0.004, fit={"overhead_ms": 0.01, "per_unit_ms": 0.0, "scale": 0.5,
                                                          "alone_scale_above": threshold})
    over = sum(1 for u in units if math.prod(u.in_shape) > threshold)
    assert 0 < over < len(units)
    prediction = latency.predict(model, table)
    assert prediction.ms == pytest.approx(0.01 + 0.5 * 0.004 * over + 0.004 * (len(units) - over))
    assert sum(prediction.by_path().values()) == pytest.approx(prediction.ms - 0.01)


def test_prediction_takes_each_units_terms_by_where_it_was_timed(tmp_path):
    model = compiler.compile_spec(_tiny(tmp_path))
    fit = {"overhead_ms": 0.01, "per_unit_ms": 0.0002, "scale": 0.9, "in_model_per_unit_ms": -0.0001,
           "alone_scale": 1.2, "alone_per_unit_ms": -0.0005}
    table = _table(tmp_path, model, lambda u: 0.004, fit=fit)
    units = latency.units(model)
    seen = units[::2]  # measured inside a profiled model: 0.003 ms there
    for u in seen:
        table.entries[u.key]["ctx"] = {"m@1": 0.003}
    table.touch()
    prediction = latency.predict(model, table)
    assert {how for _, _, how in prediction.units} == {latency.IN_MODEL, "measured"}
    expected = (0.01 + 0.0002 * len(units) + len(seen) * (0.9 * 0.003 - 0.0001)
                + (len(units) - len(seen)) * (1.2 * 0.004 - 0.0005))
    assert prediction.ms == pytest.approx(expected)
    assert sum(prediction.by_path().values()) == pytest.approx(len(seen) * 0.9 * 0.003
                                                              + (len(units) - len(seen)) * 1.2 * 0.004)
    # the per-unit terms reaching only units over SMALL_UNIT_INPUTS: none of this tiny model's
    assert all(math.prod(u.in_shape) <= latency.SMALL_UNIT_INPUTS for u in units)
    table.fit.update(in_model_per_unit_above=latency.SMALL_UNIT_INPUTS, alone_per_unit_above=latency.SMALL_UNIT_INPUTS)
    assert latency.predict(model, table).ms == pytest.approx(
        0.01 + 0.0002 * len(units) + len(seen) * 0.9 * 0.003 + (len(units) - len(seen)) * 1.2 * 0.004)
    # a table fitted before the two instruments were told apart: one scale, no per-unit corrections
    old = _table(tmp_path, model, lambda u: 0.004, fit={"overhead_ms": 0.01, "per_unit_ms": 0.0002, "scale": 0.9})
    assert latency.predict(model, old).ms == pytest.approx(0.01 + len(units) * (0.0002 + 0.9 * 0.004))


def test_a_units_weights_are_its_own_layers_tensors_not_a_residuals_branch():
    model = compiler.compile_source("model m { input 8x4x4 residual { conv(8) bn relu } gap flatten linear(2) }",
                                    "m.spec")
    conv, residual, *_ = latency.units(model)
    nodes = {n.path: n for n in model.root.walk()}
    assert conv.weights == sum(t.numel for p in conv.paths for t in nodes[p].tensors) > 8 * 8 * 9
    assert residual.text == "residual { identity }" and residual.weights == 0
    assert residual.moved == 2 * 8 * 4 * 4  # its add's input and output, none of the branch's weights


def test_the_cold_size_and_cost_per_weight_come_from_the_units_timed_inside_the_models():
    """The table's own in-model times show what reading weights from memory costs: a model's weight-bound
    units took longer inside it than alone, in proportion to their weights, in models over a size and
    not below it. The size is the candidate that explains those excesses best, the cost the models'
    median over it (one model whose layers ran otherwise inside it does not move it), and the terms of
    units alone are fitted on what is left."""
    from runtime.profile import fit

    step, empty, per_weight = 0.0002, 0.005, 1e-7
    models = {}
    for i, (net, n, moved, weights, excess) in enumerate([
            (0.05, 5, 10_000, 2_000, 0.0), (0.4, 30, 500_000, 90_000, 2e-10), (2.0, 12, 3_000_000, 300_000, -1e-10),
            (3.0, 40, 6_000_000, 9_000_000, 1.1e-7), (1.2, 60, 30_000_000, 2_000_000, 0.9e-7),
            (7.0, 80, 40_000_000, 5_000_000, 1.0e-7), (9.0, 90, 60_000_000, 20_000_000, -3e-7),
            (0.8, 20, 20_000_000, 1_000_000, 1.0e-7)]):
        cold = per_weight * weights if moved > 4_194_304 else 0.0  # 3M moved stays in the cache, 6M does not
        models[str(i)] = {"inputs": 3072, "empty_ms": empty, "units": n, "moved": moved, "weights": weights,
                          "cold_excess_ms": excess * weights / 2, "cold_weights": weights // 2,
                          "measured_ms": empty + step * n + net + cold, "sum_ms": net + cold, "alone_ms": net / 1.1}
    f = fit(models, step)
    assert f["cold_above"] == 4_194_304
    assert f["cold_ms_per_weight"] == pytest.approx(per_weight)  # the median of 1.1, 0.9, 1.0, -3 and 1.0
    assert (f["alone_scale"], f["alone_per_unit_ms"]) == pytest.approx((1.1, 0.0), abs=1e-9)
    warm = {k: {**c, "cold_excess_ms": 0.0} for k, c in models.items()}
    assert "cold_ms_per_weight" not in fit(warm, step) and "cold_above" not in fit(warm, step)


def test_units_alone_in_a_large_model_pay_for_their_weights_from_memory():
    """Alone a unit runs with its weights in the cache; inside a model whose units move over `cold_above`
    elements in all they come from memory on each run. In a table from before the units' in-model
    excesses were kept, the fit finds that size among COLD_ABOVE_CANDIDATES and a cost per weight of the
    units alone from the whole models where that fits them better, and leaves both out where it does not."""
    from runtime.profile import fit

    step, empty, per_weight = 0.0002, 0.005, 1e-7
    models = {}
    for i, (net, n, moved, weights) in enumerate([
            (0.05, 5, 10_000, 2_000), (0.4, 30, 500_000, 90_000), (2.0, 12, 3_000_000, 300_000),
            (7.0, 80, 40_000_000, 5_000_000), (3.0, 40, 6_000_000, 9_000_000), (1.2, 60, 30_000_000, 2_000_000),
            (0.3, 9, 800_000, 700_000)]):
        cold = per_weight * weights if moved > 4_194_304 else 0.0  # 3M moved stays in the cache, 6M does not
        models[str(i)] = {"inputs": 3072, "empty_ms": empty, "units": n, "moved": moved, "weights": weights,
                          "measured_ms": empty + step * n + net + cold, "sum_ms": net + cold, "alone_ms": net / 1.1}
    f = fit(models, step)
    assert f["cold_above"] == 4_194_304
    assert (f["alone_scale"], f["alone_per_unit_ms"], f["cold_ms_per_weight"]) == pytest.approx(
        (1.1, 0.0, per_weight), abs=1e-9)
    assert (f["scale"], f["in_model_per_unit_ms"]) == pytest.approx((1.0, 0.0), abs=1e-9)  # in-model times hold it
    warm = {k: {**c, "measured_ms": empty + step * c["units"] + c["alone_ms"] * 1.1} for k, c in models.items()}
    assert "cold_ms_per_weight" not in fit(warm, step) and "cold_above" not in fit(warm, step)


def test_prediction_adds_the_weights_of_the_units_alone_in_a_model_over_the_cold_size(tmp_path):
    model = compiler.compile_spec(_tiny(tmp_path))
    units = latency.units(model)
    moved, weights = sum(u.moved for u in units), sum(u.weights for u in units)
    table = _table(tmp_path, model, lambda u: 0.004,
                   fit={"overhead_ms": 0.01, "scale": 1.0, "cold_ms_per_weight": 1e-6, "cold_above": moved - 1})
    warm = 0.01 + 0.004 * len(units)
    assert weights > 0 and latency.predict(model, table).ms == pytest.approx(warm + 1e-6 * weights)
    seen = units[::2]  # measured inside a profiled model: their time there holds their weights' reads
    for u in seen:
        table.entries[u.key]["ctx"] = {"m@1": 0.004}
    table.touch()
    alone = sum(u.weights for u in units[1::2])
    assert latency.predict(model, table).ms == pytest.approx(warm + 1e-6 * alone)
    table.fit["cold_above"] = moved  # a model of this size keeps its weights in the cache
    assert latency.predict(model, table).ms == pytest.approx(warm)


def test_small_ort_units_are_timed_by_the_clock(monkeypatch):
    """The profiler reports whole microseconds, most of a small unit's time: a small unit is its time less
    the empty model's, paired, by the clock, and less the step before each node after the first, its
    reorders into and out of ORT's blocked layout (and int8's conversions at its edges) included; not a
    large input, or int8's float head (whose int8 conv after it is no part of its time). On int8 the unit
    runs with its conv in int8, as after a model's float head."""
    from runtime.profile import measure
    from runtime.profile.measure import unit_ms

    def timed(text, shape, target="ort-fp32", variant=""):
        unit = latency.Unit(text, shape, 0, 0, variant=variant)
        model = compiler.compile_source(measure.unit_spec(unit), "unit")
        units.append(model)
        return unit_ms(model, compiler.compile_source(latency.baseline_spec(shape), "e"), target, samples=5,
                       variant=variant, step_ms=0.0002)

    units = []

    small = timed("bn", (8,))
    assert small["clock"] == "wall" and 0 <= small["ms"] < 0.02
    assert timed("relu", (4, 8, 8))["clock"] == "wall"
    blocked = timed("conv(16, kernel=3)", (16, 8, 8))  # in and out of ORT's blocked layout
    assert blocked["clock"] == "wall" and 0 <= blocked["ms"] < 0.05
    side = int((2 * latency.SMALL_UNIT_INPUTS) ** 0.5)
    assert "clock" not in timed("relu", (1, side, side))
    graphs = []
    real_graph = measure._ort_graph
    monkeypatch.setattr(measure, "_ort_graph", lambda *a: graphs.append((a[0], *a[1:])) or real_graph(*a))
    int8 = timed("conv(8, kernel=3)", (4, 8, 8), "ort-int8")
    assert int8["clock"] == "wall" and 0 <= int8["ms"] < 0.05
    assert {g[1:] for g in graphs if g[0] is units[-1]} == {("ort-int8", False)}  # the unit's conv in int8
    assert "clock" not in timed("conv(8, kernel=3)", (4, 8, 8), "ort-int8", "float")


def test_the_overhead_follows_the_empty_models_measured_flat_below_and_along_the_slope_above():
    from compiler.latency import overhead_at
    from runtime.profile import fit

    calibration = {f"m{n}": {"sum_ms": 1.0, "units": 3, "inputs": n, "empty_ms": ms, "measured_ms": ms + 1.0}
                   for n, ms in [(3072, 0.004), (12288, 0.005), (150528, 0.019), (196608, 0.027)]}
    f = fit(calibration, 0.0)  # a measured step of 0 between units
    assert f["overhead_points"] == [[3072, 0.004], [12288, 0.005], [150528, 0.019], [196608, 0.027]]
    assert overhead_at(f, 100) == overhead_at(f, 3072) == 0.004  # a call's fixed cost: not the line's intercept
    assert f["overhead_ms"] + f["overhead_ms_per_input"] * 100 != pytest.approx(0.004, rel=0.05)
    assert overhead_at(f, 12288) == pytest.approx(0.005) and overhead_at(f, 7680) == pytest.approx(0.0045)
    assert overhead_at(f, 296608) == pytest.approx(0.027 + 100000 * f["overhead_ms_per_input"])
    assert f["scale"] == pytest.approx(1.0)  # every model: empty + its units
    assert overhead_at({"overhead_ms": 0.01, "overhead_ms_per_input": 1e-6}, 1000) == pytest.approx(0.011)


@pytest.mark.slow  # profiles for real (two subprocesses each)
@pytest.mark.parametrize("target", ["ort-fp32", "ort-int8", "torch-fp32"])
def test_profile_measures_each_unit_once_resumes_and_checks_its_prediction(tmp_path, tables, target, in_root):
    spec = _tiny(tmp_path).read_text().replace("ort-fp32", target)
    (tmp_path / "t.spec").write_text(spec)
    argv = [sys.executable, "-m", "runtime", "profile", "--target", target, "--specs", str(tmp_path / "t.spec"),
            "--samples", "3"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    model = compiler.compile_spec(tmp_path / "t.spec")
    keys = {u.key for u in latency.units_on(model, target)}
    table = latency.load_table(target)
    assert set(table.entries) == keys and all(e["ms"] >= 0 for e in table.entries.values())
    assert f"{len(keys)} units measured, 0 already in the table" in first.stdout
    calibration = table.fit["models"]["tiny@3x16x16"]
    assert calibration["measured_ms"] > calibration["empty_ms"] > 0  # the empty model is the overhead
    assert table.fit["overhead_ms"] == pytest.approx(calibration["empty_ms"])  # one input size measured
    if target.startswith("ort"):  # what pruning to its latency rounds channels to (ORT's blocked layout)
        assert table.fit["channel_block"] in (8, 16) and table.settings == {}
    else:
        assert "channel_block" not in table.fit and table.settings["allocator"].startswith("glibc")
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # resumes: nothing to measure
    assert f"0 units measured, {len(keys)} already in the table" in again.stdout
    check = subprocess.run([*argv[:4], "--target", target, "--check", str(tmp_path / "t.spec"), "--samples", "3"],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    row = next(line for line in check.stdout.splitlines() if line.startswith("| tiny@3x16x16"))
    predicted, measured = (float(c) for c in row.split("|")[2:4])
    assert predicted == pytest.approx(latency.predict(model, latency.load_table(target)).ms, abs=1e-3)
    assert measured > 0 and math.isfinite(predicted)


def test_search_rejects_on_a_latency_budget_and_ranks_by_predicted_latency(tmp_path, tables, capsys):
    from compiler.search import pareto, search

    spec = tmp_path / "space.spec"
    spec.write_text(TINY.replace("width: int = 8", "width: int = 8 in [4, 8, 12, 16, 24]"))
    widest = compiler.compile_spec(_tiny(tmp_path, "1000ms", "w.spec"), params={"width": 24})
    _table(tmp_path, widest, lambda u: 1e-3 + u.macs * 1e-8)  # measured at width 24: the rest from their nearest
    limit = latency.predict(compiler.compile_spec(_tiny(tmp_path, "1000ms", "w.spec"), params={"width": 12}),
                            latency.load_table("ort-fp32")).ms
    spec.write_text(spec.read_text().replace("LIMIT", f"{limit * 1000 * 1.0001:.6f}us"))  # width 12 just fits
    result = search(spec, latency_target="ort-fp32")
    kept = sorted(c.params["width"] for c in result.candidates)
    assert kept == [4, 8, 12] and result.rejected == 2
    for c in result.candidates:
        assert c.latency_ms == pytest.approx(latency.predict(c.model, latency.load_table("ort-fp32")).ms)
    assert [c.params["width"] for c in pareto(result.candidates, "latency")] == [4, 8, 12]
    assert main(["search", str(spec), "--objective", "latency"]) == 0
    assert "most params for the least latency(ort-fp32)" in capsys.readouterr().out


def test_a_units_latency_is_spread_over_the_channels_it_reads_and_writes():
    from compiler.rewrite.channels import analyse_channels

    model = compiler.compile_source("model m { input 3x8x8 a: conv(8) bn relu b: conv(16) bn relu gap flatten "
                                    "linear(10) }", "m.spec")
    spaces = analyse_channels(model.root)
    (first, second) = sorted(spaces.prunable(), key=lambda s: spaces.size[s])
    costs = spaces.per_channel([(("a", "a.1", "a.2"), 0.8), (("b", "b.1", "b.2"), 1.6)])
    assert costs[first] == pytest.approx(0.8 / 8 + 1.6 / 8)  # a writes it, b reads it
    assert costs[second] == pytest.approx(1.6 / 16)  # only b touches it among the costed groups


def test_pruning_to_half_the_predicted_latency_lands_at_it(tmp_path, tables):
    import dataclasses

    from compiler.rewrite.channels import analyse_channels, rewrite
    from runtime.rewrite.prune import choose, importance, latency_costs, predicted_latency_ms, shrink_to

    model = compiler.compile_spec(ROOT / "specs" / "student.spec", input_shape=(3, 32, 32))
    _table(tmp_path, model, lambda u: 2e-3 + u.moved * 1e-7 + u.macs * 1e-9)
    module = compiler.build_module(model)
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, "l1")
    costs = latency_costs(model, spaces, "ort-fp32", scores)
    assert set(costs) == set(scores) and min(costs.values()) > 0
    now = predicted_latency_ms(model, "ort-fp32")
    rate = shrink_to(model, module, scores, "global", "latency", now / 2, costs=costs, cost_power=0.5)
    kept = choose(scores, rate, "global", costs=costs, cost_power=0.5)
    pruned = dataclasses.replace(model, root=rewrite(model.root, spaces, {s: len(i) for s, i in kept.items()}))
    assert now / 2 * 0.9 <= predicted_latency_ms(pruned, "ort-fp32") <= now / 2


def test_pruning_times_the_chosen_widths_the_table_lacks_in_memory_and_chooses_again(tmp_path, tables):
    """A pruned width's units are otherwise estimated from the nearest measured unit: settle times them on
    this machine into the table in memory (its file, outside the run directory, stays as profiled) and
    picks again, until the chosen model has no estimated unit."""
    import dataclasses

    from compiler.rewrite.channels import analyse_channels, rewrite
    from runtime.profile.missing import measure_missing
    from runtime.rewrite.prune import choose, importance
    from runtime.steps.prune import settle

    model = compiler.compile_spec(_tiny(tmp_path))
    table = _table(tmp_path, model, lambda u: 0.004)
    on_disk = table.path.read_bytes()
    module = compiler.build_module(model)
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, "l1")
    picks = []

    def pick():
        picks.append(1)
        return 0.5, choose(scores, 0.5, "global")

    rate, kept, timed = settle(model, spaces, "ort-fp32", pick)
    pruned = dataclasses.replace(model, root=rewrite(model.root, spaces, {s: len(i) for s, i in kept.items()}))
    assert rate == 0.5 and timed > 0 and len(picks) == 2  # picked, timed, picked again: nothing left to time
    prediction = latency.predict(pruned, latency.cached_table("ort-fp32"))
    assert prediction.estimated == 0
    fresh = [ms for u, ms, _ in prediction.units if u.key not in table.entries]
    assert len(fresh) == timed and all(0 <= ms < 0.05 for ms in fresh)
    assert table.path.read_bytes() == on_disk
    assert measure_missing(pruned, "ort-fp32") == 0


def test_pruning_to_a_latency_on_ort_rounds_to_the_tables_channel_block_unless_told(tmp_path, tables):
    from runtime.rewrite.prune import channel_multiple

    model = compiler.compile_spec(_tiny(tmp_path))
    table = _table(tmp_path, model, lambda u: 0.01, fit={"overhead_ms": 0.0, "scale": 1.0, "channel_block": 16})
    assert channel_multiple(None, "ort-fp32", True) == 16
    assert channel_multiple(None, "ort-weights", True) == 16  # the same kernels, the same table
    assert channel_multiple(None, "ort-fp32", False) == 1  # pruning to params or MACs: no layout to honour
    assert channel_multiple(3, "ort-fp32", True) == 3  # round_to as given
    assert channel_multiple(None, "torch-fp32", True) == 1  # PyTorch has no blocked layout: no table read
    raw = json.loads(table.path.read_text())
    del raw["fit"]["channel_block"]  # a table without it (profiled on a CPU with no blocked layout)
    stamp = table.path.stat().st_mtime_ns
    table.path.write_text(json.dumps(raw))
    os.utime(table.path, ns=(stamp + 10**9, stamp + 10**9))  # a new version, however coarse the clock
    assert channel_multiple(None, "ort-fp32", True) == 1


@pytest.mark.slow  # a real (small) study
def test_a_study_records_predicted_and_measured_latency_and_plots_accuracy_against_it(tmp_path, tables, capsys):
    import csv

    spec = _tiny(tmp_path, "1000ms")
    model = compiler.compile_spec(spec)
    _table(tmp_path, model, lambda u: 0.004)
    (tmp_path / "r.yaml").write_text("name: r\ndata: {limit_per_class: 6}\nsteps:\n  - {name: train, kind: train, "
                                     "epochs: 1}\n  - {name: export, kind: export}\n")
    (tmp_path / "s.yaml").write_text("name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a}\n"
                                     "  - {name: b, params: {width: 4}}\n")
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(out), "--device", "cpu"]) == 0, \
        capsys.readouterr().err[-2000:]
    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    table = latency.load_table("ort-fp32")
    for name, width in (("a", 8), ("b", 4)):
        expected = latency.predict(compiler.compile_spec(spec, params={"width": width}), table).ms
        assert float(rows[name]["latency_ms"]) == pytest.approx(expected)
        measured = json.loads((out / "trials" / name / "report.json").read_text())["steps"][-1]["metrics"]
        assert float(rows[name]["measured_latency_ms"]) == pytest.approx(measured["onnx_latency_ms"]["float"])
    assert (out / "pareto_latency.png").stat().st_size > 0


def test_profile_takes_in_configurations_of_a_specs_search_space(tmp_path):
    from runtime.profile import _models

    spec = tmp_path / "space.spec"
    spec.write_text(TINY.replace("width: int = 8", "width: int = 8 in [4, 8, 12, 16, 24]").replace("LIMIT", "9ms"))
    models = _models([str(spec)], ["3x32x32"], space=3)
    assert len(models) == 4 and all(m.input_shape == (3, 32, 32) for m in models)
    assert len({m.params["width"] for m in models[1:]}) == 3
    assert len(_models([str(spec)], [], space=0)) == 1


def test_an_unmeasured_unit_moves_along_its_structures_fitted_costs(tmp_path):
    cost = lambda u: 0.002 + 1e-8 * u.macs + 3e-7 * u.moved  # noqa: E731
    table = None
    for width in (4, 8, 12, 16, 20):
        model = compiler.compile_spec(_tiny(tmp_path), params={"width": width})
        table = _table(tmp_path, model, cost) if table is None else table
        for u in latency.units(model):
            table.entries[u.key] = {"ms": cost(u), "macs": u.macs, "moved": u.moved, "structure": u.structure}
    wide = compiler.compile_spec(_tiny(tmp_path), params={"width": 24})
    fitted = 0
    for unit, ms, how in latency.predict(wide, table).units:
        assert how.startswith("nearest ")
        if latency._slopes(table, unit.structure) is not None:
            fitted += 1
            assert ms == pytest.approx(cost(unit), rel=1e-6)
    assert fitted >= 2  # the residual's conv (MACs grow as width squared) and the pools at least


def test_ort_profiles_map_back_to_units_and_in_model_times_correct_the_rest(tmp_path):
    from runtime.profile import attribute
    from runtime.profile.measure import ort_node_ms

    model = compiler.compile_spec(_tiny(tmp_path))
    nodes = ort_node_ms(model, 1, 1, runs=10)
    spent = attribute(model, nodes)
    assert set(spent) == {u.key for u in latency.units(model)}
    # every kernel but ORT's own layout reorders lands on a unit (each unit here is one of its key)
    assert all(name.startswith("Reorder") or name.removesuffix("_nchwc").split("#")[0] in
               {p for u in latency.units(model) for p in u.paths} for name in nodes), sorted(nodes)
    owned = sum(ms for name, ms in nodes.items() if not name.startswith("Reorder"))
    assert sum(spent.values()) == pytest.approx(owned)
    conv = next(u for u in latency.units(model) if u.text.startswith("conv"))
    assert spent[conv.key] > 0
    # a unit measured inside a model counts its mean in-model time; others their time alone
    table = _table(tmp_path, model, lambda u: 0.01)
    table.entries[conv.key]["ctx"] = {"m@1": 0.02, "m@2": 0.04}
    assert latency.in_context(table.entries[conv.key]) == pytest.approx(0.03)
    # ... of the models nearest in input size, when the table knows them (a unit after large layers costs more)
    sizes = {"m@1": 3072, "m@2": 150528}
    assert latency.in_context(table.entries[conv.key], 4096, sizes) == pytest.approx(0.02)
    assert latency.in_context(table.entries[conv.key], 200_000, sizes) == pytest.approx(0.04)
    assert latency.in_context(table.entries[conv.key], 4096, {"m@1": 3072}) == pytest.approx(0.03)  # one unknown
    other = next(k for k, e in table.entries.items() if k != conv.key)
    assert latency.in_context(table.entries[other]) == pytest.approx(0.01)


def test_ort_unit_times_are_net_of_the_profilers_floor_and_of_reorders(monkeypatch):
    """A chain of layers that do no work reports about nothing once the profiler's floor, measured in the
    same runs, is off; a conv alone pays reorders into and out of ORT's blocked layout, which its kernel
    time leaves out."""
    from runtime.profile import measure
    from runtime.profile.measure import ADDED, FLOOR_PREFIX, _profiled, ort_kernel_ms, ort_node_ms

    idle = compiler.compile_source("model idle {\n    input 1x1x1\n    relu relu relu relu\n}\n", "idle")
    order, ms, ops, floors = _profiled(idle, 1, 1, runs=200)
    assert len(order) == 4 and set(ms) == set(ops) == set(floors) == set(order)
    assert not any(n.startswith(FLOOR_PREFIX) for n in order)
    assert all(0 < f < 0.05 for f in floors.values())  # a few microseconds
    raw = sum(ms.values())
    net = raw - sum(floors.values())
    assert abs(net) < 0.5 * raw, (ms, floors)  # most of what no-op nodes report is the floor
    monkeypatch.setattr(measure, "_profiled", lambda *a, **k: (order, ms, ops, floors))
    assert ort_node_ms(idle, 1, 1) == {n: ms[n] - floors[n] for n in order}
    monkeypatch.undo()
    unit = compiler.compile_source("model unit {\n    input 16x32x32\n    conv(16, kernel=3) bn relu\n}\n", "u")
    nodes = ort_node_ms(unit, 1, 1)
    reorders = sum(ms for name, ms in nodes.items() if ADDED.match(name))
    assert reorders > 0, sorted(nodes)  # 16 channels: ORT's blocked layout, entered and left
    # the kernel time of these very node times (a second profile would differ by the machine's noise)
    monkeypatch.setattr(measure, "ort_node_ms", lambda *a, **k: nodes)
    kernel = ort_kernel_ms(unit, 1, 1)
    assert 0 < kernel == pytest.approx(sum(nodes.values()) - reorders)


def test_on_ort_int8_the_float_head_is_a_unit_of_its_own():
    """The int8 file keeps its first conv in float (runtime/deploy/qdq.py), and ORT runs the pool after it
    as a uint8 pool in plain layout: on ort-int8 the first conv and the pools right after it are one
    "float" unit, timed with an int8 conv after it whose time is left out; and every layer's node in the
    int8 file maps back to a unit."""
    from runtime.profile.measure import PROBE, unit_spec

    model = compiler.compile_spec(ROOT / "specs" / "student.spec")
    plain, int8 = latency.units_on(model, "ort-fp32"), latency.units_on(model, "ort-int8")
    assert plain[0].text.startswith("conv(") and plain[1].text.startswith("maxpool(")
    head = int8[0]
    assert head.variant == "float" and head.text == f"{plain[0].text} {plain[1].text}"
    assert head.paths == plain[0].paths + plain[1].paths and head.macs == plain[0].macs + plain[1].macs
    assert head.key.endswith(" [float]") and head.structure.endswith(" [float]")
    assert int8[1:] == plain[2:]
    assert unit_spec(head).rstrip().removesuffix("}").rstrip().endswith(PROBE)
    assert unit_spec(plain[0]) == plain[0].spec()
    probed = compiler.compile_source(unit_spec(head), "unit")
    assert probed.root.children[-1].op == "conv" and probed.root.total_macs > head.macs
    assert latency.units_on(model, "torch-fp32") == plain
    from runtime.profile.measure import ADDED, CONVERSIONS, _profiled, node_path

    resnet = compiler.compile_spec(ROOT / "specs" / "zoo" / "resnet50.spec", input_shape=(3, 32, 32))
    order, _, ops, _ = _profiled(resnet, 1, 1, runs=2, target="ort-int8")
    paths = {p for u in latency.units_on(resnet, "ort-int8") for p in u.paths}
    assert [n for n in order if node_path(n) not in paths and not ADDED.match(n) and ops[n] not in CONVERSIONS] == []


def test_profiled_node_names_map_back_to_layer_paths():
    from runtime.profile.measure import ADDED, node_path

    assert node_path("features.4.pw_nchwc") == "features.4.pw"  # our graph, ORT's blocked kernel
    assert node_path("features.3#2") == "features.3"  # our writer's second node of a layer
    assert node_path("/features/features.10/features.10.0/dw/Conv_token_23") == "features.10.0.dw"  # torch's
    assert node_path("/fc/Gemm") == "fc" and node_path("/features/features.0/Conv_output_0_nchwc") == "features.0"
    assert node_path("/layer1/layer1.0/layer1.0.0/body/body.3/Conv_token_7") == "layer1.0.0.body.3"
    assert all(ADDED.match(n) for n in ("ReorderInput", "ReorderOutput_token_145", "Transpose_token_52"))
    assert not any(ADDED.match(n) for n in ("features.3", "/features/features.7/Transpose", "Transposed"))


def test_the_profilers_floor_grows_with_a_nodes_inputs():
    """Each node's floor: the ReLU chain's for one input, the Add chain's extra for each input after the
    first (a QLinearConv has 8 or 9), and a node reading the model's input what the chains' first pays more."""
    from runtime.profile.measure import FLOOR_NODES, FLOOR_PREFIX, _floors

    ms = {f"{FLOOR_PREFIX}Relu#{i}": 0.008 if i == 1 else 0.006 for i in range(1, FLOOR_NODES + 1)}
    ms.update({f"{FLOOR_PREFIX}Add#{i}": 0.0065 for i in range(1, FLOOR_NODES + 1)})
    floors = _floors(ms, {"a": 1, "b": 3, "c": 9}, ["a", "b", "c"])
    assert floors == pytest.approx({"a": 0.008, "b": 0.007, "c": 0.010})
    ms.update({f"{FLOOR_PREFIX}Add#{i}": 0.005 for i in range(1, FLOOR_NODES + 1)})  # noise: never below one input
    assert _floors(ms, {"b": 3}, ["b"]) == pytest.approx({"b": 0.008})
    # never over what the model's own nodes reported in the same runs (the chains caught by a slow spell)
    ms.update({"a": 0.009, "b": 0.0058, "c": 0.012})
    floors = _floors(ms, {"a": 1, "b": 1, "c": 2}, ["a", "b", "c"])
    assert floors["b"] == pytest.approx(0.0058) and floors["c"] == pytest.approx(0.0058)
    assert floors["a"] == pytest.approx(0.0058 + 0.002)  # the first node's extra for reading the input stays


def test_the_step_between_kernels_is_the_median_of_the_rounds_a_fast_spell_met(tmp_path, monkeypatch):
    """Rounds of both chains, the probe around each: rounds a slow spell caught (the probe over GATE x its
    fastest) are left out however they read, and rounds go on until STEP_ROUNDS fast ones are taken."""
    import runtime.profile as profile
    from runtime.profile import measure
    from runtime.profile.steady import GATE, Steadiness

    calls = []
    monkeypatch.setattr(measure, "TIMERS", {"ort-fp32": lambda model, threads, batch: len(model.root.children)})
    monkeypatch.setattr(profile, "STEP_MIN_S", 0.0)
    fast_steps = [0.0016, 0.0018, 0.0019, 0.0018, 0.0017, 0.0020, 0.0018]
    slow_steps = [0.0040, 0.0038, 0.0036]  # the first three rounds, in a slow spell: left out
    steps = slow_steps + fast_steps
    times = iter([t for d in steps for t in (0.010, 0.010 + d)])
    monkeypatch.setattr(measure, "median_ms", lambda call, samples, warmup=10: calls.append(call) or next(times))
    probes = iter([2 * GATE] * 2 * len(slow_steps) + [1.0] * 2 * len(fast_steps))  # before and after each round

    def now(self):
        ms = next(probes)
        self.fastest = min(self.fastest, ms)
        return ms

    monkeypatch.setattr(Steadiness, "now", now)
    table = latency.Table(tmp_path / "t.json", "ort-fp32", 1, 1, latency.machine(), {}, {})
    step = profile._step_ms(table, 5, Steadiness("ort-fp32", 1, 1, call=lambda: None))
    assert calls == list(profile.STEP_CHAINS) * len(steps)  # the two chains in turn, every round
    assert len(fast_steps) == profile.STEP_ROUNDS  # and no round more once that many fast ones are taken
    assert step == pytest.approx(0.0018 / (profile.STEP_CHAINS[1] - profile.STEP_CHAINS[0]))
