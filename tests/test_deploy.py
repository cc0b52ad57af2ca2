"""The `weights` ONNX form: the model file's own codes, decoded in the graph exactly as nccompile decodes
them, folded by ONNX Runtime once at load, on real images (cifar10-mini)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import compiler
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
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@needs_data
@pytest.mark.parametrize("spec, fmt", [("student.spec", "int8"), ("student.spec", "int8-channel"),
                                       ("student.spec", "int4"), ("student.spec", "int3-channel"),
                                       ("student.spec", parse_format("int8", fold_bn=True)),
                                       ("student_4bit.spec", "spec"), ("student.spec", "fp16")])
def test_the_weights_form_runs_the_model_files_own_weights_at_load_folded(spec, fmt, tmp_path):
    model, module = _student(spec)
    path = tmp_path / "m.safetensors"
    save_model(module, model, path, fmt)
    file = ModelFile(path)
    rebuilt = file.build()
    onnx_path = tmp_path / "m.onnx"
    shipped = export_weights(rebuilt, file, onnx_path, 17)
    import onnx

    floats = [i for i in onnx.load(str(onnx_path)).graph.initializer if i.data_type != onnx.TensorProto.UINT8
              and i.name in file.stored]
    if file.format.quantized:  # every weight ships as codes (tensors equal in value are exported once)
        assert shipped >= 0.9 * (len(file.stored) - 1) and not floats, (shipped, [i.name for i in floats])
    else:
        assert shipped == 0 and floats
    x = _images()
    with torch.no_grad():
        expected = rebuilt(x).numpy()
    got = _session(onnx_path, tmp_path / "opt.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert not ops.keys() & {"Cast", "Div", "DequantizeLinear"}, ops  # expanded once, at session creation


def test_the_8bit_student_ships_under_the_course_budget_and_a_quarter_of_the_float_export(tmp_path):
    model, module = _student()
    path = tmp_path / "m.safetensors"
    file_bytes = save_model(module, model, path, "int8")
    file = ModelFile(path)
    export_weights(file.build(), file, tmp_path / "w.onnx", 17)
    export_float(file.build(), model.input_shape, tmp_path / "f.onnx", 17)
    weights_bytes, float_bytes = (tmp_path / "w.onnx").stat().st_size, (tmp_path / "f.onnx").stat().st_size
    assert weights_bytes <= 300_000 and weights_bytes < 1.1 * file_bytes and weights_bytes < 0.3 * float_bytes, (
        weights_bytes, file_bytes, float_bytes)


def test_4bit_codes_ship_packed_two_to_a_byte(tmp_path):
    """int4 codes as ONNX UINT4 (opset 21): the int4 student deploys under 160,000 bytes."""
    import onnx

    model, module = _student()
    file_bytes = save_model(module, model, tmp_path / "m.safetensors", "int4")
    file = ModelFile(tmp_path / "m.safetensors")
    export_weights(file.build(), file, tmp_path / "w.onnx", 17)
    graph = onnx.load(str(tmp_path / "w.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert {i.data_type for i in graph.graph.initializer if i.name.endswith(".codes")} == {onnx.TensorProto.UINT4}
    size = (tmp_path / "w.onnx").stat().st_size
    assert size <= 160_000 and size < 1.15 * file_bytes, (size, file_bytes)


@pytest.mark.slow
def test_the_export_step_writes_the_weights_form(tmp_path, capsys, in_root):
    import json

    from runtime.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: q, kind: quantize, format: int8}\n"
                      "  - {name: export, kind: export, format: weights}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--input", "3x16x16", "--device", "cpu",
                 "--set", "data.limit_per_class=5", "--out", str(out)]) == 0, capsys.readouterr()
    metrics = {s["name"]: s["metrics"] for s in json.loads((out / "report.json").read_text())["steps"]}["export"]
    onnx_path = out / "steps" / "export" / "student.onnx"
    assert metrics["onnx_bytes"] == onnx_path.stat().st_size < 1.1 * metrics["file_bytes"]
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


@pytest.mark.slow
def test_a_torchvision_spec_exports_without_reading_the_files_embedded_spec(tmp_path, monkeypatch):
    """The export step passes the run's model: the teacher's file (a torchvision spec, which ModelFile
    refuses to rebuild from itself without NCCOMPILE_TRUST_TORCHVISION) exports as any other."""
    monkeypatch.delenv("NCCOMPILE_TRUST_TORCHVISION", raising=False)
    model = compiler.compile_spec(SPECS / "teacher.spec", input_shape=(3, 32, 32), params={"classes": 10})
    module = compiler.build_module(model)
    save_model(module, model, tmp_path / "t.safetensors", "fp16")
    file = ModelFile(tmp_path / "t.safetensors")
    built = file.build(model)
    assert export_weights(built, file, tmp_path / "t.onnx", 17, model=model) == 0  # fp16: nothing to ship as codes
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = built(x).numpy()
    got = _session(tmp_path / "t.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
