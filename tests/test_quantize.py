"""Quantization end to end: kd_wq on real images, every format's accuracy, integer kernels, export."""
from __future__ import annotations

import json

import pytest

import compiler
from runtime.cli import main
from runtime.weights import ModelFile, save_model

from .conftest import DATA, SPECS
from .test_runtime import SMALL_TEACHER, needs_data


@pytest.mark.slow
@needs_data
def test_kd_wq_end_to_end(tmp_path, capsys, in_root):
    teacher = tmp_path / "teacher.spec"
    teacher.write_text(SMALL_TEACHER)
    out = tmp_path / "run"
    code = main(["specs/student.spec", "--recipe", "kd_wq", "--data", str(DATA), "--set", "data.limit_per_class=100",
                 "--set", f"models.teacher.spec={teacher}", "--set", "steps.teacher.epochs=3",
                 "--set", "steps.distill.epochs=6", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    steps = json.loads((out / "report.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["teacher", "distill", "quantize", "evaluate", "export"]
    q = {s["name"]: s for s in steps}["quantize"]
    student10 = compiler.compile_spec(SPECS / "student.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    predicted = compiler.predicted_bytes(student10, "int8")
    assert q["file_bytes"] == predicted == (out / "steps/quantize/model.safetensors").stat().st_size
    assert q["file_bytes"] <= 268_471
    m = q["metrics"]
    assert m["fp32_val_accuracy"] > 0.2, "the distilled student should have learned something"
    assert abs(m["accuracy_drop"]) <= 0.01, m  # 8-bit within 1 point of fp32
    integer = m["integer"]  # ONNX Runtime's int8 kernels (QDQ), next to ORT on the float export
    assert integer["engine"].startswith("onnxruntime") and integer["integer_ops"] > 0
    assert integer["latency_ms_batch1"]["int8"] > 0 and integer["latency_ms_batch1"]["fp32"] > 0
    assert abs(integer["val_accuracy"] - m["val_accuracy"]) < 0.05
    # the report ends with the quantized model's bytes and accuracy
    last = steps[-1]
    assert last["file_bytes"] == predicted and last["val_accuracy"] == pytest.approx(m["val_accuracy"])
    # the deployable ONNX ships the 8-bit codes: under the course's 300,000 bytes, near the model file
    onnx_bytes = (out / "steps/export/student.onnx").stat().st_size
    assert onnx_bytes <= 300_000 and onnx_bytes < 1.1 * predicted, (onnx_bytes, predicted)
    exported_metrics = {s["name"]: s for s in steps}["export"]["metrics"]
    assert exported_metrics["onnx_bytes"] == onnx_bytes == exported_metrics["onnx_predicted_bytes"]
    assert f"student.onnx ({onnx_bytes:,} bytes, predicted {onnx_bytes:,})" in stdout
    exported = (out / "steps/export/student.safetensors").read_bytes()
    assert exported == (out / "steps/quantize/model.safetensors").read_bytes()
    # `nccompile load` rebuilds it from the file alone
    assert main(["load", str(out / "steps/export/student.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "int8" and info["output"] == [10] and info["bytes"] == predicted

    # every format from the same distilled model, reported whatever it gives
    fp32_file = out / "steps/distill/model.safetensors"
    module = ModelFile(fp32_file).build(student10)
    from runtime.data import list_source, load
    from runtime.data.transforms import Pipeline
    from runtime.recipe import DataConfig
    from runtime.train.evaluation import score_split

    cfg = DataConfig(path=str(DATA), limit_per_class=100)
    data = load(list_source(cfg), cfg, (3, 32, 32), 0)
    accuracy = {}
    for fmt in ("fp16", "int8-channel", "int4", "int2"):
        path = tmp_path / f"{fmt}.safetensors"
        assert save_model(module, student10, path, fmt) == compiler.predicted_bytes(student10, fmt)
        q_module = ModelFile(path).build(student10)
        accuracy[fmt] = score_split(q_module, data.val, Pipeline([], "eval", 3, (32, 32)), 10).accuracy
    assert abs(accuracy["fp16"] - m["fp32_val_accuracy"]) < 0.005
    assert abs(accuracy["int8-channel"] - m["fp32_val_accuracy"]) <= 0.01
    assert 0.0 <= accuracy["int2"] <= 1.0  # honest, whatever it is


def test_quantize_step_rejects_unknown_format(capsys, in_root, tmp_path):
    recipe = tmp_path / "q.yaml"
    recipe.write_text("name: q\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: q, kind: quantize, format: int9}\n")
    assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
    assert "unknown format `int9`" in capsys.readouterr().err


def test_a_file_that_will_break_a_budget_stops_the_run_before_any_work(capsys, in_root, tmp_path):
    """Keeping every tensor as fp32 makes the 8-bit file 4x larger than student.spec's bytes(int8)
    budget allows: said before training, not after it. After a prune step the spec is another one,
    and only the written file can tell."""
    out = tmp_path / "run"
    code = main(["specs/student.spec", "--recipe", "kd_wq", "--set", 'steps.quantize.keep=["*"]', "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "quantize step `quantize`: bytes(int8) <= 300,000 fails: " in err, err
    assert err.strip().endswith("(predicted file); nothing was run") and not out.exists()
    pruned = tmp_path / "p.yaml"
    pruned.write_text("name: p\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: p, kind: prune, rate: 0.3, finetune: null}\n"
                      "  - {name: q, kind: quantize, format: int8, keep: ['*']}\n")
    assert main(["specs/student.spec", "--recipe", str(pruned), "--dry-run"]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_quantize_step_writes_mixed_precision_of_the_predicted_size(tmp_path, capsys, in_root):
    recipe = tmp_path / "q.yaml"
    recipe.write_text("name: q\ndata: {limit_per_class: 5}\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: q, kind: quantize, format: int4-channel, evaluate: false,\n"
                      "     formats: {'fc.*': int8-channel, '*.running_*': fp16}}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--device", "cpu", "--out", str(out)]) == 0
    step = json.loads((out / "report.json").read_text())["steps"][1]
    m = step["metrics"]
    assert m["file_bytes"] == m["predicted_bytes"] == (out / step["model_file"]).stat().st_size
    assert ModelFile(out / step["model_file"]).format.overrides == (("fc.*", "int8-channel"), ("*.running_*", "fp16"))
    capsys.readouterr()
    for formats, fragment in (("{'fc.*': int9}", "formats.fc.*: unknown format `int9`"),
                              ("{'head.*': int8}", "formats pattern(s) 'head.*' match no tensor of `student`")):
        recipe.write_text("name: q\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                          f"  - {{name: q, kind: quantize, format: int4, formats: {formats}}}\n")
        assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
        assert fragment in capsys.readouterr().err
