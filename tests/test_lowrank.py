"""Low-rank factorization: exact at full rank, smaller below it, expressed in a spec that recompiles."""
from __future__ import annotations

import json

import pytest
import torch

import compiler
from runtime.rewrite.lowrank import factorize_module
from runtime.steps.lowrank import LowrankConfig

from .conftest import DATA, SPECS
from .measure import measure
from .test_runtime import needs_data


def _model(name):
    model = compiler.compile_spec(SPECS / name, params={"classes": 10}, input_shape=(3, 32, 32))
    return model, compiler.build_module(model, seed=2).eval()


@pytest.mark.parametrize("name", ["student.spec", "resnet18.spec"])
def test_full_rank_factorization_is_exact(name):
    model, module = _model(name)
    new_model, new_module, _, ranks = factorize_module(model, module, LowrankConfig(
        name="l", rank_by="ratio", ratio=1.0, only_if_smaller=False))
    # student: its first conv and fc (the rest is depthwise or 1x1); resnet18: stem, 16 body convs, fc
    assert len(ranks) == {"student.spec": 2, "resnet18.spec": 18}[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (new_module.eval()(x) - module(x)).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [dict(rank_by="ratio", ratio=0.25), dict(rank_by="energy", energy=0.5)])
def test_factorized_resnet_is_smaller_and_matches_its_spec(cfg):
    model, module = _model("resnet18.spec")
    new_model, new_module, text, ranks = factorize_module(model, module, LowrankConfig(name="l", **cfg))
    again = compiler.compile_source(text, "lowrank.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    a = compiler.analyse(again)
    got = measure(new_module, (3, 32, 32))
    assert got["params"] == a.params < compiler.analyse(model).params
    assert got["macs"] == a.macs
    names = {n for n, _ in again.root.state_tensors()}
    assert ranks and all(f"{path}.0.weight" in names and f"{path}.1.weight" in names for path in ranks)


@pytest.mark.slow
@needs_data
def test_lowrank_step_in_a_recipe(tmp_path, capsys, in_root):
    from runtime.cli import main

    recipe = tmp_path / "lr.yaml"
    recipe.write_text("""
name: lr
input: 3x32x32
data: {limit_per_class: 20}
steps:
  - {name: train, kind: train, epochs: 1}
  - {name: lowrank, kind: lowrank, rank_by: ratio, ratio: 0.5, finetune: {epochs: 1}}
  - {name: evaluate, kind: evaluate}
""")
    out = tmp_path / "run"
    code = main(["specs/resnet18.spec", "--recipe", str(recipe), "--data", str(DATA), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    steps = {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}
    assert steps["lowrank"]["params"] < steps["train"]["params"]
    assert steps["evaluate"]["params"] == steps["lowrank"]["params"]
    assert steps["lowrank"]["file_bytes"] == (out / "steps/lowrank/model.safetensors").stat().st_size
