"""The `weights` ONNX form: the model file's own codes, decoded in the graph exactly as nccompile decodes
them, folded by ONNX Runtime once at load, on real images (cifar10-mini)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import compiler
from compiler import fileformat, onnxgraph
from compiler.fileformat import parse_format
from runtime.deploy.onnx_export import export_float, export_weights
from runtime.weights import ModelFile, save_model

from .conftest import DATA, SPECS

ort = pytest.importorskip("onnxruntime")  # in the `test` extra; a bare install without it skips here
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real images not found at {DATA}")


def _images(n: int = 32) -> torch.Tensor:
    from PIL import Image

    files = sorted((DATA / "val").glob("*/*"))[:: max(1, len(sorted((DATA / "val").glob("*/*"))) // n)][:n]
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                        for f in files]).float() / 255


def _student(spec: str = "student.spec"):
    model = compiler.compile_spec(SPECS / spec, input_shape=(3, 32, 32), params={"classes": 10})
    module = compiler.build_module(model)
    with torch.no_grad():  # statistics that are not trivial, so folding and rounding them matters
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    return model, module


def _session(path, optimized=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # not the warning that a saved optimized graph is specific to this machine
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort(path, x: np.ndarray) -> np.ndarray:
    return _session(path).run(None, {"images": x})[0]


def _close(got, expected) -> None:
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@needs_data
@pytest.mark.parametrize("spec, fmt", [("student.spec", "int8"), ("student.spec", "int8-channel"),
                                       ("student.spec", "int4"), ("student.spec", "int3-channel"),
                                       ("student.spec", parse_format("int8", fold_bn=True)),
                                       ("student_4bit.spec", "spec"), ("student.spec", "fp16"),
                                       ("student.spec", parse_format("int4", keep=("*.bias",), keep_dtype="F16"))])
def test_the_weights_form_runs_the_model_files_own_weights_at_load_folded(spec, fmt, tmp_path):
    import onnx

    model, module = _student(spec)
    path = tmp_path / "m.safetensors"
    save_model(module, model, path, fmt)
    file = ModelFile(path)
    rebuilt = file.build()
    onnx_path = tmp_path / "m.onnx"
    size = export_weights(file, onnx_path)
    assert size == onnx_path.stat().st_size == onnxgraph.predicted_bytes(model, file.format)
    inits = onnx.load(str(onnx_path)).graph.initializer
    codes = [i for i in inits if i.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT4)]
    quantized = [e for e in fileformat.model_layout(model, file.format).entries if e.bits is not None]
    assert len(codes) == len(quantized)  # every quantized tensor ships as its codes
    x = _images()
    with torch.no_grad():
        expected = rebuilt(x).numpy()
    got = _session(onnx_path, tmp_path / "opt.onnx").run(None, {"images": x.numpy()})[0]
    _close(got, expected)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert not ops.keys() & {"Cast", "Div", "DequantizeLinear"}, ops  # expanded once, at session creation


def test_the_8bit_student_ships_under_the_course_budget_and_a_quarter_of_the_float_export(tmp_path):
    model, module = _student()
    path = tmp_path / "m.safetensors"
    file_bytes = save_model(module, model, path, "int8")
    file = ModelFile(path)
    weights_bytes = export_weights(file, tmp_path / "w.onnx")
    export_float(file.build(), model.input_shape, tmp_path / "f.onnx", 17)
    float_bytes = (tmp_path / "f.onnx").stat().st_size
    assert weights_bytes <= 300_000 and weights_bytes < 1.1 * file_bytes and weights_bytes < 0.3 * float_bytes, (
        weights_bytes, file_bytes, float_bytes)


def test_4bit_codes_ship_packed_two_to_a_byte(tmp_path):
    """int4 codes as ONNX UINT4 (opset 21): the int4 student deploys under 160,000 bytes."""
    import onnx

    model, module = _student()
    file_bytes = save_model(module, model, tmp_path / "m.safetensors", "int4")
    size = export_weights(ModelFile(tmp_path / "m.safetensors"), tmp_path / "w.onnx")
    graph = onnx.load(str(tmp_path / "w.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert {i.data_type for i in graph.graph.initializer if i.data_type != onnx.TensorProto.FLOAT} == {
        onnx.TensorProto.UINT4}
    assert size <= 160_000 and size < 1.15 * file_bytes, (size, file_bytes)


ACTIVATIONS_AND_POOLS = """model acts {
    input 3x17x17
    conv(8) relu6 gelu silu hardswish hardsigmoid sigmoid tanh leaky_relu(0.2) relu
    maxpool(kernel=3, stride=2, ceil=true) avgpool(kernel=3, stride=2, padding=1, ceil=true)
    conv(8, bias=false) bn(affine=false) dropout(0.1) identity
    adaptive_avgpool(1) flatten linear(16) bn layernorm relu linear(4, bias=false)
}"""


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
@pytest.mark.parametrize("text", ["every", ACTIVATIONS_AND_POOLS])
def test_every_op_and_construct_runs_in_onnx_runtime_as_in_torch(text, fmt, tmp_path):
    """Each op record writes its own ONNX nodes; together they cover every op but torchvision's."""
    from .test_constructs import EVERY_CONSTRUCT, _trained_like

    model = compiler.compile_source(EVERY_CONSTRUCT if text == "every" else text, "t.spec")
    module = _trained_like(model)
    save_model(module, model, tmp_path / "m.safetensors", fmt)
    file = ModelFile(tmp_path / "m.safetensors")
    assert export_weights(file, tmp_path / "m.onnx") == onnxgraph.predicted_bytes(model, fmt)
    x = torch.rand(3, *model.input_shape)
    with torch.no_grad():
        _close(_ort(tmp_path / "m.onnx", x.numpy()), file.build()(x).numpy())


def test_every_op_but_torchvision_has_an_onnx_form():
    from compiler.ops import OPS

    assert {name for name, op in OPS.items() if op.onnx is None} == {"torchvision", "tv-part"}


def _shipped_specs():
    zoo = sorted(f"zoo/{p.name}" for p in (SPECS / "zoo").glob("*.spec"))
    return sorted(p.name for p in SPECS.glob("*.spec")) + zoo


@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s.startswith("zoo/") else s
                                  for s in _shipped_specs()])
def test_the_predicted_onnx_bytes_are_the_written_files_for_every_shipped_spec(spec, tmp_path):
    """From the spec alone (no torch), the `weights` form's size to the byte: with and without the class
    names, with the preprocessing in the graph, at the spec's own input size."""
    model = compiler.compile_spec(SPECS / spec)
    if any(n.op == "torchvision" for n in model.root.walk()):
        with pytest.raises(onnxgraph.ExportError, match="no ONNX form"):
            onnxgraph.predicted_bytes(model, "int8")
        return
    module = compiler.build_module(model)
    fmt = "spec" if model.definition.precision is not None else "int8"
    save_model(module, model, tmp_path / "m.safetensors", fmt)
    file = ModelFile(tmp_path / "m.safetensors")
    classes = [f"class {i}" for i in range(model.root.out_shape[0])]
    pre = onnxgraph.Preprocessing(uint8=True, layout="nhwc", fixed_batch=1)
    for kwargs in ({}, {"classes": classes, "pre": pre}):
        size = export_weights(file, tmp_path / "m.onnx", model, **kwargs)
        assert size == (tmp_path / "m.onnx").stat().st_size == onnxgraph.predicted_bytes(model, fmt, **kwargs)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_uint8_images_in_with_the_scaling_and_normalization_in_the_graph(layout, tmp_path):
    import onnx

    model, module = _student()
    save_model(module, model, tmp_path / "m.safetensors", "int8")
    file = ModelFile(tmp_path / "m.safetensors")
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    pre = onnxgraph.Preprocessing(uint8=True, layout=layout, fixed_batch=2, mean=mean, std=std)
    assert export_weights(file, tmp_path / "m.onnx", pre=pre) == onnxgraph.predicted_bytes(model, "int8", pre=pre)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fed = images.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else images
    normalized = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = file.build()(normalized).numpy()
    _close(_ort(tmp_path / "m.onnx", fed.numpy()), expected)
    graph = onnx.load(str(tmp_path / "m.onnx"))
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ([2, 32, 32, 3] if layout == "nhwc" else [2, 3, 32, 32])  # static: batch 2, as asked
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["nccompile.input"] == ("32x32x3" if layout == "nhwc" else "3x32x32")
    assert "uint8" in meta["nccompile.preprocessing"]


def test_the_yaml_front_states_an_onnx_budget_too(tmp_path):
    text = (SPECS / "student.yaml").read_text().replace("bytes(int8): 300_000", "onnx(int4): 150_000")
    (tmp_path / "s.yaml").write_text(text)
    model = compiler.compile_spec(tmp_path / "s.yaml")
    (budget,) = compiler.analyse(model).budgets
    assert (budget.metric, budget.format, budget.value) == ("onnx", "int4", onnxgraph.predicted_bytes(model, "int4"))
    assert budget.ok


def test_an_onnx_budget_is_checked_from_the_spec_before_any_training(tmp_path, capsys):
    from runtime.cli import main

    text = (SPECS / "student.spec").read_text().replace("budget bytes(int8) <= 300_000",
                                                         "budget onnx(int8) <= 250_000")
    spec = tmp_path / "s.spec"
    spec.write_text(text)
    predicted = onnxgraph.predicted_bytes(compiler.compile_spec(spec), "int8")
    assert main([str(spec)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  onnx(int8) <= 250,000: {predicted:,}" in out and f"ONNX bytes:   int8 {predicted:,}" in out


@pytest.mark.slow
def test_the_export_step_writes_the_weights_form(tmp_path, capsys, in_root):
    import json

    from runtime.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: q, kind: quantize, format: int8}\n"
                      "  - {name: export, kind: export, format: weights}\n")
    spec = tmp_path / "s.spec"
    spec.write_text((SPECS / "student.spec").read_text().replace("budget bytes(int8) <= 300_000",
                                                                 "budget onnx(int8) <= 300_000"))
    out = tmp_path / "run"
    assert main([str(spec), "--recipe", str(recipe), "--input", "3x16x16", "--device", "cpu",
                 "--set", "data.limit_per_class=5", "--out", str(out)]) == 0, capsys.readouterr()
    metrics = {s["name"]: s["metrics"] for s in json.loads((out / "report.json").read_text())["steps"]}["export"]
    onnx_path = out / "steps" / "export" / "student.onnx"
    assert metrics["onnx_bytes"] == onnx_path.stat().st_size == metrics["onnx_predicted_bytes"]
    assert metrics["onnx_bytes"] < 1.1 * metrics["file_bytes"]
    assert metrics["budgets"] == [{"name": "onnx(int8) <= 300,000", "value": metrics["onnx_bytes"], "ok": True,
                                   "measured_on": "onnx file"}]
    latency = metrics["onnx_latency_ms"]  # the shipped file's, in ONNX Runtime, beside the float export's
    assert set(latency) == {"weights", "float"} and all(v > 0 for v in latency.values())
    assert "ms for the float export" in capsys.readouterr().out
    file = ModelFile(out / "steps" / "export" / "student.safetensors")
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        expected = file.build()(x).numpy()
    got = _session(onnx_path).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.slow
@needs_data
def test_the_readme_inference_script_runs_the_exported_file_with_onnxruntime_numpy_and_pillow(tmp_path, capsys,
                                                                                              in_root):
    """The README's script, as written, on the file `kd_wq`'s export step writes: its answer is the class
    nccompile's own model gives the same image."""
    import subprocess
    import sys

    from PIL import Image

    from runtime.cli import main

    text = (SPECS.parent / "README.md").read_text()
    script = text.split("<!-- inference-script -->")[1].split("<!-- /inference-script -->")[0]
    script = script.split("```python")[1].split("```")[0]
    (tmp_path / "predict.py").write_text(script)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ninput: 3x32x32\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: q, kind: quantize, format: int8}\n"
                      "  - {name: export, kind: export, format: weights}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--data", str(DATA), "--device", "cpu",
                 "--set", "data.limit_per_class=10", "--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    classes = sorted(p.name for p in (DATA / "val").iterdir() if p.is_dir())
    model = ModelFile(out / "steps" / "export" / "student.safetensors").build()
    agree = 0
    images = sorted((DATA / "val").glob("*/*"))[::200][:8]
    for image in images:
        proc = subprocess.run([sys.executable, str(tmp_path / "predict.py"), str(out / "steps/export/student.onnx"),
                               str(image)], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            expected = classes[int(model(x).argmax())]
        agree += proc.stdout.strip() == expected
    assert agree == len(images)


def test_a_torchvision_spec_exports_as_float_and_says_why_not_as_weights(tmp_path, monkeypatch):
    """The teacher (torchvision's own ResNet18) has no ONNX form in the writer: the `weights` form says
    so; torch's exporter writes its float form, from the run's model (not the file's embedded spec)."""
    monkeypatch.delenv("NCCOMPILE_TRUST_TORCHVISION", raising=False)
    model = compiler.compile_spec(SPECS / "teacher.spec", input_shape=(3, 32, 32), params={"classes": 10})
    module = compiler.build_module(model)
    save_model(module, model, tmp_path / "t.safetensors", "fp16")
    file = ModelFile(tmp_path / "t.safetensors")
    with pytest.raises(onnxgraph.ExportError, match="`torchvision` has no ONNX form.*format: float"):
        export_weights(file, tmp_path / "t.onnx", model)
    assert not (tmp_path / "t.onnx").exists()
    built = file.build(model)
    export_float(built, model.input_shape, tmp_path / "t.onnx", 17)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = built(x).numpy()
    _close(_ort(tmp_path / "t.onnx", x.numpy()), expected)


@needs_data
def test_the_int8_form_runs_on_integer_kernels_and_agrees_with_the_model(tmp_path):
    """ONNX Runtime's static quantization (QDQ), calibrated on real images: after ORT's fusions every conv
    is a QLinearConv and the classifier a QGemm; nothing computes in float but the first conv when asked;
    the classes agree."""
    from runtime.deploy.onnx_module import OnnxModule
    from runtime.deploy.qdq import export_int8, fused_ops

    model, module = _student()
    x = _images(64)
    convs = sum(n.op == "conv" for n in model.root.walk())
    export_int8(module, model.input_shape, [x[:32].numpy()], tmp_path / "all.onnx", float_first_conv=False)
    ops, float_layers = fused_ops(tmp_path / "all.onnx")
    assert ops["QLinearConv"] == convs and ops["QGemm"] + ops["QLinearMatMul"] == 1 and not float_layers, ops
    export_int8(module, model.input_shape, [x[:32].numpy()], tmp_path / "q.onnx")
    ops, float_layers = fused_ops(tmp_path / "q.onnx")
    assert ops["QLinearConv"] == convs - 1 and float_layers == ["features.0"], (ops, float_layers)
    with torch.no_grad():
        expected = module(x).argmax(1)
    got = OnnxModule(tmp_path / "q.onnx", model.input_shape)(x).argmax(1)
    assert (got == expected).float().mean() >= 0.9


def _pools_reading_uint8(path, tmp_path) -> list[str]:
    """The MaxPools of the graph ONNX Runtime runs that read a QuantizeLinear's output (uint8)."""
    import onnx

    nodes = onnx.load(str(_optimized(path, tmp_path))).graph.node
    quantized = {o for n in nodes if n.op_type == "QuantizeLinear" for o in n.output}
    return [n.name for n in nodes if n.op_type == "MaxPool" and n.input[0] in quantized]


def test_the_int8_form_pools_in_float_after_its_float_first_conv_and_computes_the_same(tmp_path, monkeypatch):
    """The student's head is conv bn relu6 maxpool, the conv in float. Left as exported, ORT moves the
    next Q back across the pool and runs it on uint8 in plain NCHW (the slow kernel); with relu6 after
    the pool it pools in float. Swapping them is exact: the logits are bit for bit the same."""
    from runtime.deploy import qdq

    model, module = _student()
    calibration = [np.random.default_rng(0).random((8, *model.input_shape), dtype=np.float32)]
    qdq.export_int8(module, model.input_shape, calibration, tmp_path / "q.onnx")
    monkeypatch.setattr(qdq, "pool_before_activation", lambda graph: 0)
    qdq.export_int8(module, model.input_shape, calibration, tmp_path / "as_exported.onnx")
    assert _pools_reading_uint8(tmp_path / "as_exported.onnx", tmp_path), "ORT no longer pools uint8 here"
    assert _pools_reading_uint8(tmp_path / "q.onnx", tmp_path) == []
    x = calibration[0][:4]
    np.testing.assert_array_equal(_ort(tmp_path / "q.onnx", x), _ort(tmp_path / "as_exported.onnx", x))


def test_the_int8_form_keeps_a_batchnorm_that_follows_no_conv_in_float(tmp_path):
    """A BatchNorm after a pool (densenet's pre-activation) cannot fold into a conv, and ORT has no int8
    kernel for it: quantized, its parameters would be dequantized on every call. It stays in float,
    its parameters plain initializers, between the int8 convs."""
    import onnx

    from runtime.deploy.qdq import export_int8

    model = compiler.compile_source("model pre {\n    input 3x16x16\n    conv(8) maxpool(2) bn relu conv(8) "
                                    "gap flatten linear(4)\n}\n", "pre.spec")
    module = compiler.build_module(model).eval()
    calibration = [np.random.default_rng(0).random((8, *model.input_shape), dtype=np.float32)]
    export_int8(module, model.input_shape, calibration, tmp_path / "q.onnx", float_first_conv=False)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    constants = {t.name for t in graph.initializer}
    (bn,) = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert all(name in constants for name in bn.input[1:]), list(bn.input)
    ops = Counter(n.op_type for n in onnx.load(str(_optimized(tmp_path / "q.onnx", tmp_path))).graph.node)
    assert ops["QLinearConv"] == 2 and ops["BatchNormalization"] == 1, ops
    with torch.no_grad():
        expected = module(torch.from_numpy(calibration[0])).numpy()
    got = _ort(tmp_path / "q.onnx", calibration[0])
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def _optimized(path, tmp_path):
    _session(path, optimized=tmp_path / "optimized.onnx")
    return tmp_path / "optimized.onnx"


def test_pool_before_activation_swaps_only_a_float_activation_read_by_the_pool_alone():
    import onnx
    from onnx import helper

    from runtime.deploy.qdq import pool_before_activation

    def graph(*nodes, outputs=("y",)):
        return helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                                 [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs])

    pool = helper.make_node("MaxPool", ["a"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    g = graph(helper.make_node("Relu", ["x"], ["a"]), pool)
    assert pool_before_activation(g) == 1
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [
        ("MaxPool", ["x"], ["y_before_Relu"]), ("Relu", ["y_before_Relu"], ["y"])]
    shared = graph(helper.make_node("Relu", ["x"], ["a"]), pool, helper.make_node("Neg", ["a"], ["z"]),
                   outputs=("y", "z"))  # the activation's output is read twice: left alone
    assert pool_before_activation(shared) == 0
    assert pool_before_activation(graph(helper.make_node("Sigmoid", ["x"], ["a"]), pool)) == 0


def test_model_onnx_mapping_names_the_file_to_score():
    from pydantic import ValidationError

    from runtime.steps.evaluate import EvaluateConfig, PredictConfig

    cfg = EvaluateConfig.model_validate({"name": "e", "model": {"onnx": "steps/export/student.onnx"}})
    assert (cfg.onnx, cfg.model) == ("steps/export/student.onnx", "student")
    assert PredictConfig.model_validate({"name": "p", "onnx": "/abs/m.onnx"}).onnx == "/abs/m.onnx"
    with pytest.raises(ValidationError, match="onnx: PATH"):
        EvaluateConfig.model_validate({"name": "e", "model": {"file": "m.onnx"}})


@pytest.mark.slow
@needs_data
def test_evaluate_scores_the_deployed_onnx_file_itself(tmp_path, capsys, in_root):
    """The file a user ships (int8 codes, uint8 NHWC images in, the recipe's normalization inside, static
    batch 8), scored on cifar10-mini's validation images by `evaluate`, agrees with nccompile's own
    model; so does the int8 QDQ form, within a few images; a missing file is a clear error."""
    import json

    from runtime.cli import main

    steps = ("steps:\n  - {name: t, kind: train, epochs: 1}\n  - {name: q, kind: quantize, format: int8}\n"
             "  - {name: deploy, kind: export, format: weights, embed_preprocessing: true, layout: nhwc,"
             " fixed_batch: 8}\n"
             "  - {name: int8, kind: export, format: int8, calibration_images: 64}\n"
             "  - {name: own, kind: evaluate}\n"
             "  - {name: shipped, kind: evaluate, model: {onnx: steps/deploy/student.onnx}}\n"
             "  - {name: qdq, kind: evaluate, onnx: steps/int8/student.onnx}\n")
    norm = "{normalize: {mean: [0.5, 0.4, 0.3], std: [0.25, 0.2, 0.3]}}"  # inside the shipped graph
    head = f"name: r\ninput: 3x32x32\ntransforms: {{train: [{norm}], eval: [{norm}]}}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(head + steps)
    out = tmp_path / "run"
    args = ["specs/student.spec", "--recipe", str(recipe), "--data", str(DATA), "--device", "cpu",
            "--set", "data.limit_per_class=10", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    metrics = {s["name"]: s["metrics"] for s in json.loads((out / "report.json").read_text())["steps"]}
    own, shipped = metrics["own"], metrics["shipped"]
    assert shipped["images"] == own["images"] > 0
    moved = np.abs(np.array(own["confusion_matrix"]) - np.array(shipped["confusion_matrix"])).sum()
    assert moved <= 2 and abs(shipped["val_accuracy"] - own["val_accuracy"]) <= 0.005, (moved, own, shipped)
    # int8 activations too: 3 of 100 images at most change class on this barely trained student
    assert abs(metrics["qdq"]["val_accuracy"] - own["val_accuracy"]) <= 0.03, (metrics["qdq"], own)
    assert metrics["int8"]["onnx_integer_ops"] > 0 and len(metrics["int8"]["onnx_float_layers"]) == 1
    recipe.write_text(head + steps + "  - {name: gone, kind: evaluate, onnx: steps/deploy/missing.onnx}\n")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no ONNX file at" in err and "missing.onnx" in err and "Traceback" not in err


@pytest.mark.parametrize("spec", ["student.spec", "zoo/mobilenet_v2.spec"])
def test_onnx_runtime_runs_the_weights_form_as_the_float_export_node_for_node(spec, tmp_path):
    """Why the shipped file is as fast as the float export: once ORT has folded the decoding at load,
    the graph it runs has exactly the float export's nodes (fused convs, pools, gemm)."""
    import onnx

    from .measure import trained_like

    model = compiler.compile_spec(SPECS / spec, input_shape=(3, 64, 64), params={"classes": 10})
    save_model(trained_like(compiler.build_module(model)), model, tmp_path / "m.safetensors", "int8")
    file = ModelFile(tmp_path / "m.safetensors")
    export_weights(file, tmp_path / "w.onnx", model)
    export_float(file.build(model), model.input_shape, tmp_path / "f.onnx", 17)
    graphs = []
    for name in ("w", "f"):
        _session(tmp_path / f"{name}.onnx", tmp_path / f"{name}.opt.onnx")
        graphs.append(Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.opt.onnx")).graph.node))
    assert graphs[0] == graphs[1]


@needs_data
def test_the_dry_run_shows_the_deployed_files_exact_size(capsys, in_root):
    """kd_wq's plan knows the model file's format at its export (int8, from the quantize step) and the
    data's class names: `--dry-run` prints the ONNX file's bytes before any work."""
    from runtime.cli import main

    assert main(["specs/student.spec", "--recipe", "kd_wq", "--data", str(DATA), "--dry-run"]) == 0
    out = capsys.readouterr().out
    classes = sorted(p.name for p in (DATA / "train").iterdir() if p.is_dir())
    model = compiler.compile_spec(SPECS / "student.spec", input_shape=(3, 32, 32), params={"classes": len(classes)})
    assert f"ONNX (int8 weights): {onnxgraph.predicted_bytes(model, 'int8', classes):,} bytes, predicted" in out
