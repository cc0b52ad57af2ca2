"""specs/zoo: one spec per torchvision builder, equal to torchvision's model in parameters, MACs
(FlopCounterMode on torchvision's module at 224x224) and outputs under torchvision's weights; and
every compression step works on each."""
from __future__ import annotations

import json

import pytest
import torch

import compiler
from compiler.rewrite.channels import analyse_channels
from runtime.cli import main
from runtime.rewrite.prune import choose, importance, prune_model
from runtime.torchvision_state import load_torchvision_state, torchvision_module
from runtime.weights import model_bytes

from .conftest import SPECS
from .measure import measure, trained_like

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m "not slow"` skips them

ZOO = sorted(p.stem for p in (SPECS / "zoo").glob("*.spec"))
SMALL = (3, 64, 64)  # compression and weight tests run at a small input: the counts do not need 224


def test_the_zoo_has_every_family():
    assert ZOO == sorted(["resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                          "shufflenet_v2_x1_0", "squeezenet1_1", "densenet121", "regnet_x_400mf", "convnext_tiny"])


@pytest.mark.parametrize("name", ZOO)
def test_counts_equal_torchvision(name, capsys):
    from torch.utils.flop_counter import FlopCounterMode

    assert main([str(SPECS / "zoo" / f"{name}.spec"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tv = torchvision_module(name, "meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tv(torch.empty(1, 3, 224, 224, device="meta"))
    assert report["params"] == sum(p.numel() for p in tv.parameters())
    assert report["macs"] == counter.get_total_flops() // 2


@pytest.mark.parametrize("name", ZOO)
def test_torchvision_weights_give_torchvision_outputs(name, tmp_path):
    from safetensors.torch import save_file

    tv = trained_like(torchvision_module(name))  # a BatchNorm paired wrongly shows in the outputs
    g = torch.Generator().manual_seed(0)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    model = compiler.compile_spec(SPECS / "zoo" / f"{name}.spec", input_shape=SMALL)
    ours = compiler.build_module(model)
    assert load_torchvision_state(ours, model, path) == len(list(model.root.state_tensors()))
    x = torch.randn(2, *SMALL, generator=g)
    with torch.no_grad():
        assert (ours.eval()(x) - tv(x)).abs().max().item() < 1e-5
    # another class count: everything but the classifier is loaded, which keeps its fresh init
    ten = compiler.compile_spec(SPECS / "zoo" / f"{name}.spec", input_shape=SMALL, params={"classes": 10})
    assert load_torchvision_state(compiler.build_module(ten), ten, path) < len(list(ten.root.state_tensors()))


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("rate, method, scope", [(0.5, "l1", "layer"), (0.75, "bn", "layer"),
                                                 (0.3, "random", "global")])
def test_pruning_recompiles_shrinks_and_runs(name, rate, method, scope):
    model = compiler.compile_spec(SPECS / "zoo" / f"{name}.spec", input_shape=SMALL, params={"classes": 10})
    module = compiler.build_module(model).eval()
    spaces = analyse_channels(model.root)
    assert spaces.prunable(), f"{name}: nothing to prune"
    new_model, new_module, text = prune_model(model, module, choose(importance(module, spaces, method), rate, scope),
                                              spaces)
    again = compiler.analyse(compiler.compile_source(text, "pruned.spec"))
    got = measure(new_module, SMALL)
    assert got["params"] == again.params < compiler.analyse(model).params
    assert got["macs"] == again.macs and got["output"] == (10,)


@pytest.mark.parametrize("name", ZOO)
def test_rate_one_keeps_the_outputs(name):
    model = compiler.compile_spec(SPECS / "zoo" / f"{name}.spec", input_shape=SMALL, params={"classes": 10})
    module = compiler.build_module(model).eval()
    spaces = analyse_channels(model.root)
    _, new_module, _ = prune_model(model, module, choose(importance(module, spaces, "l1"), 1.0, "layer"), spaces)
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert (new_module.eval()(x) - module(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ZOO)
def test_every_weight_format_is_predicted_exactly(name):
    from compiler.fileformat import SUMMARY_FORMATS, parse_format

    model = compiler.compile_spec(SPECS / "zoo" / f"{name}.spec", input_shape=SMALL, params={"classes": 10})
    module = compiler.build_module(model)
    for fmt in [*map(parse_format, SUMMARY_FORMATS + ("bf16", "int3-channel")),
                parse_format("int8-channel", fold_bn=True), parse_format("int4", keep=("*.bias",))]:
        assert len(model_bytes(module, model, fmt)) == compiler.predicted_bytes(model, fmt), fmt


@pytest.mark.parametrize("name", ZOO)
def test_lowrank_applies(name):
    from runtime.rewrite.lowrank import factorize_module
    from runtime.steps.lowrank import LowrankConfig

    model = compiler.compile_spec(SPECS / "zoo" / f"{name}.spec", input_shape=SMALL, params={"classes": 10})
    module = compiler.build_module(model).eval()
    new_model, new_module, text, ranks = factorize_module(model, module, LowrankConfig(
        name="l", rank_by="ratio", ratio=0.25))
    again = compiler.analyse(compiler.compile_source(text, "lowrank.spec"))
    assert ranks and measure(new_module, SMALL)["params"] == again.params < compiler.analyse(model).params


def test_a_recipe_starts_a_zoo_teacher_from_torchvision_weights(tmp_path, capsys, in_root):
    from safetensors.torch import save_file

    tv = torchvision_module("mobilenet_v3_small")
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "tv.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: r
data: {{limit_per_class: 3}}
models: {{teacher: {{spec: {SPECS / "zoo" / "mobilenet_v3_small.spec"}, torchvision_state: tv.safetensors}}}}
steps: [{{name: ev, kind: evaluate, model: teacher}}]
""")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--device", "cpu", "--out", str(out)]) == 0, \
        capsys.readouterr()
    assert json.loads((out / "report.json").read_text())["steps"][0]["status"] == "ran"
    bad = recipe.read_text().replace("tv.safetensors", "missing.safetensors")
    recipe.write_text(bad)
    assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
    assert "models.teacher.torchvision_state: no such file" in capsys.readouterr().err
    recipe.write_text(bad.replace(str(SPECS / "zoo" / "mobilenet_v3_small.spec"), str(SPECS / "student.spec"))
                      .replace("missing.safetensors", "tv.safetensors"))
    assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
    assert "do not pair with torchvision's student" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["densenet121", "squeezenet1_1", "shufflenet_v2_x1_0", "efficientnet_b0"])
def test_reordering_every_prunable_space_keeps_the_outputs(name):
    """Keeping every channel in a shuffled order moves each concatenated segment's weights with it:
    any slip in an offset changes the outputs."""
    model = compiler.compile_spec(SPECS / "zoo" / f"{name}.spec", input_shape=SMALL, params={"classes": 10})
    module = compiler.build_module(model).eval()
    spaces = analyse_channels(model.root)
    g = torch.Generator().manual_seed(0)
    kept = {s: torch.randperm(spaces.size[s], generator=g) for s in spaces.prunable()}
    _, new_module, _ = prune_model(model, module, kept, spaces)
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert (new_module.eval()(x) - module(x)).abs().max().item() < 1e-4


def test_a_spec_may_reference_torchvisions_regnet():
    """regnet's builder computes its widths with tensors, which the meta device cannot hold."""
    ref = compiler.compile_source("model m { input 3x64x64 torchvision regnet_x_400mf() }", "ref.spec")
    zoo = compiler.compile_spec(SPECS / "zoo" / "regnet_x_400mf.spec", input_shape=(3, 64, 64))
    assert compiler.analyse(ref).params == compiler.analyse(zoo).params == 5_495_976
