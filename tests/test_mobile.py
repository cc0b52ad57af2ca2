"""The `mobile` extra: an ExecuTorch program lowered to XNNPACK. Without the extra the export says which
extra to install; with it, the program's logits are the model's."""
from __future__ import annotations

import pytest
import torch

import compiler
from runtime.deploy import mobile

from .conftest import SPECS
from .measure import trained_like


@pytest.mark.skipif(mobile.available(), reason="ExecuTorch is installed (the `mobile` extra)")
def test_without_the_extra_the_export_names_it(tmp_path):
    model = compiler.compile_spec(SPECS / "student.spec", input_shape=(3, 32, 32))
    with pytest.raises(mobile.MobileError, match=r"pip install -e '\.\[mobile\]'"):
        mobile.export_pte(compiler.build_module(model), model.input_shape, tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists()


needs_extra = pytest.mark.skipif(not mobile.available(), reason="needs the `mobile` extra (ExecuTorch)")


@pytest.mark.slow
@needs_extra
def test_the_executorch_program_gives_the_models_logits(tmp_path):
    model = compiler.compile_spec(SPECS / "student.spec", input_shape=(3, 32, 32), params={"classes": 10})
    module = trained_like(compiler.build_module(model))
    size = mobile.export_pte(module, model.input_shape, tmp_path / "m.pte")
    assert size == (tmp_path / "m.pte").stat().st_size > 0
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = module(x)
    got = mobile.pte_runner(tmp_path / "m.pte")(x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    assert mobile.pte_latency_ms(tmp_path / "m.pte", model.input_shape, runs=5) > 0


@pytest.mark.slow
@needs_extra
def test_the_export_step_writes_the_program_and_its_latency(tmp_path, capsys, in_root):
    import json

    from runtime.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: phone, kind: export, format: executorch}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--input", "3x16x16", "--device", "cpu",
                 "--set", "data.limit_per_class=5", "--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    metrics = {s["name"]: s["metrics"] for s in json.loads((out / "report.json").read_text())["steps"]}["phone"]
    assert metrics["pte_bytes"] == (out / "steps/phone/student.pte").stat().st_size > 0
    assert metrics["pte_latency_ms"]["executorch"] > 0 and "ExecuTorch (XNNPACK)" in capsys.readouterr().out
