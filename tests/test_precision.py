"""Per-layer precision in the spec: `precision DEFAULT { "pattern": FORMAT }` (DSL) or
`precision: {default: ..., pattern: ...}` (YAML). `bytes(spec)` budgets, the analysis and the
quantize step's `format: spec` all use it, and the written file is the predicted size."""
from __future__ import annotations

import json

import pytest
import torch

import compiler
from compiler.errors import SpecError
from compiler.fileformat import parse_format, spec_format
from runtime.cli import main
from runtime.weights import ModelFile, model_bytes, state_tensors

from .conftest import SPECS

STUDENT = (SPECS / "student.spec").read_text()
MIXED = STUDENT.replace("    budget bytes(int8) <= 300_000",
                        '    precision int4-channel { "fc": int8-channel, "features.0": fp16 }\n'
                        "    budget bytes(spec) <= 160_000")


def test_the_spec_format_is_the_default_with_layer_patterns_as_overrides():
    model = compiler.compile_source(MIXED, "mixed.spec")
    fmt = spec_format(model)
    assert fmt == parse_format("int4-channel", overrides=[("fc.*", "int8-channel"), ("features.0.*", "fp16")])
    a = compiler.analyse(model)
    assert a.bytes["spec"] == compiler.predicted_bytes(model, fmt) < a.bytes["int8"]
    assert [b.name for b in a.budgets] == ["bytes(spec) <= 160,000"] and a.budgets[0].ok


@pytest.mark.parametrize("name", ["student.spec", "resnet18.spec", "origin.spec"])
def test_the_written_file_is_the_predicted_size_and_each_layer_has_its_format(name, tmp_path):
    text = (SPECS / name).read_text()
    model_line = next(line for line in text.splitlines() if line.startswith("model "))
    text = text.replace(model_line, model_line + '\n    precision int3-channel { "*.0": int8, "fc": fp16 }', 1)
    model = compiler.compile_source(text, name, params={"classes": 10})
    module = compiler.build_module(model)
    data = model_bytes(module, model, spec_format(model))
    assert len(data) == compiler.predicted_bytes(model, "spec")
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    stored = ModelFile(path).stored
    assert stored["fc.weight"].dtype == torch.float16
    rebuilt = state_tensors(ModelFile(path).build())
    assert set(rebuilt) == set(state_tensors(module))


def test_yaml_precision_is_the_same():
    yaml_text = """model:
  name: m
  input: [3, 8, 8]
  precision: {default: int4-channel, fc: int8}
  budgets: {bytes(spec): 10_000}
  layers: [{conv: 8}, gap, flatten, {linear: 3, name: fc}]
"""
    dsl_text = ('model m { input 3x8x8 precision int4-channel { "fc": int8 } budget bytes(spec) <= 10_000 '
                "conv(8) gap flatten fc: linear(3) }")
    a = compiler.compile_source(yaml_text, "m.yaml", syntax="yaml")
    b = compiler.compile_source(dsl_text, "m.spec")
    assert spec_format(a) == spec_format(b)
    from compiler.fileformat import model_layout

    assert model_layout(a, "spec").stored() == model_layout(b, "spec").stored()  # the same tensors stored


@pytest.mark.parametrize("text, fragment", [
    ('model m { input 3x8x8 precision int4-channel { "head": int8 } conv(4) gap flatten fc: linear(2) }',
     "precision pattern `head` matches no layer with weights"),
    ('model m { input 3x8x8 precision int9 conv(4) }', "unknown weight format `int9` in `precision`"),
    ('model m { input 3x8x8 precision int4 { "0": int1 } conv(4) }', "unknown weight format `int1`"),
    ("model m { input 3x8x8 budget bytes(spec) <= 1k conv(4) }", "`bytes(spec)` needs a `precision` section"),
    ("model m { input 3x8x8 precision int4 precision int8 conv(4) }", "a model has one `precision` section"),
])
def test_precision_errors_have_their_place(text, fragment):
    with pytest.raises(SpecError) as err:
        compiler.compile_source(text, "p.spec")
    assert fragment in str(err.value) and "p.spec:1:" in str(err.value), str(err.value)


def test_a_budget_no_assignment_meets_fails_before_training():
    text = MIXED.replace("budget bytes(spec) <= 160_000", "budget bytes(spec) <= 50_000")
    a = compiler.analyse(compiler.compile_source(text, "tight.spec"))
    assert not a.ok and a.budgets[0].value > 50_000


@pytest.mark.slow
def test_quantize_step_writes_the_spec_precision(tmp_path, capsys, in_root):
    spec = tmp_path / "mixed.spec"
    spec.write_text(MIXED)
    recipe = tmp_path / "q.yaml"
    recipe.write_text("name: q\ndata: {limit_per_class: 5}\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: q, kind: quantize, format: spec, evaluate: false}\n")
    out = tmp_path / "run"
    assert main([str(spec), "--recipe", str(recipe), "--device", "cpu", "--out", str(out)]) == 0
    step = json.loads((out / "report.json").read_text())["steps"][1]
    m = step["metrics"]
    assert m["file_bytes"] == m["predicted_bytes"] == (out / step["model_file"]).stat().st_size <= 160_000
    assert m["budgets"] == [{"name": "bytes(spec) <= 160,000", "value": m["file_bytes"], "ok": True,
                             "measured_on": "file"}]
    capsys.readouterr()
    assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
    assert "format `spec` needs a `precision` section" in capsys.readouterr().err


def test_pruned_and_factorized_specs_keep_the_precision():
    from compiler.rewrite.channels import analyse_channels
    from runtime.rewrite.lowrank import factorize_module
    from runtime.rewrite.prune import choose, importance, prune_model
    from runtime.steps.lowrank import LowrankConfig

    model = compiler.compile_source(MIXED, "mixed.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    module = compiler.build_module(model).eval()
    spaces = analyse_channels(model.root)
    new_model, new_module, text = prune_model(model, module, choose(importance(module, spaces, "l1"), 0.5, "layer"),
                                              spaces)
    assert '    precision int4-channel { "fc": int8-channel, "features.0": fp16 }' in text
    assert len(model_bytes(new_module, new_model, spec_format(new_model))) == compiler.predicted_bytes(new_model,
                                                                                                       "spec")
    low_model, low_module, low_text, ranks = factorize_module(model, module, LowrankConfig(
        name="l", rank_by="ratio", ratio=1.0, only_if_smaller=False))
    assert "fc" in ranks  # fc is now fc.0 and fc.1: the pattern still names it
    again = compiler.compile_source(low_text, "low.spec")
    assert spec_format(again).of("fc.1.weight").name == "int8-channel"


def test_the_summary_shows_each_layers_format(capsys):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "mixed.spec"
        spec.write_text(MIXED)
        assert main([str(spec), "--json"]) == 0
        layers = {r["path"]: r.get("format") for r in json.loads(capsys.readouterr().out)["layers"]}
        assert main([str(spec)]) == 0
        text = capsys.readouterr().out
    assert layers["fc"] == "int8-channel" and layers["features.0"] == "fp16"
    assert layers["features.4.pw"] == "int4-channel" and layers["features.2"] is None  # relu: no weights
    assert "Format" in text.splitlines()[2]
