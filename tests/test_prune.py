"""Structured pruning: exact weight copy, counts equal the emitted spec's analysis, real shrinking."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import compiler
from compiler.emit import emit
from compiler.rewrite.channels import analyse_channels
from runtime.rewrite.prune import choose, importance, prune_model
from runtime.weights import model_bytes

from .conftest import DATA, SPECS
from .measure import measure, trained_like
from .test_runtime import needs_data


def _trained_like(name, input_shape=(3, 32, 32)):
    """A built spec whose BatchNorms look trained (varied gamma and statistics)."""
    model = compiler.compile_spec(SPECS / name, params={"classes": 10}, input_shape=input_shape)
    return model, trained_like(compiler.build_module(model, seed=1))


@pytest.mark.parametrize("name", ["student.spec", "resnet18.spec", "student.yaml"])
def test_emitted_spec_roundtrips(name):
    model = compiler.compile_spec(SPECS / name)
    again = compiler.compile_source(emit(model), "emitted.spec")
    shapes = [(n, t.shape) for n, t in model.root.state_tensors()]
    assert shapes == [(n, t.shape) for n, t in again.root.state_tensors()]
    assert compiler.analyse(again).macs == compiler.analyse(model).macs


@pytest.mark.parametrize("name", ["student.spec", "resnet18.spec"])
@pytest.mark.parametrize("method", ["bn", "l1", "random"])
def test_rate_one_keeps_the_model_exactly(name, method):
    model, module = _trained_like(name)
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, method)
    new_model, new_module, _ = prune_model(model, module, choose(scores, 1.0, "layer"), spaces)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (new_module.eval()(x) - module(x)).abs().max().item() < 1e-5
    assert compiler.analyse(new_model).params == compiler.analyse(model).params


def test_weight_copy_is_exact_when_channels_are_only_reordered():
    """Keeping every channel but in a shuffled order (a permutation) must not change outputs."""
    model, module = _trained_like("resnet18.spec")
    spaces = analyse_channels(model.root)
    kept = {s: torch.randperm(spaces.size[s], generator=torch.Generator().manual_seed(s)) for s in spaces.prunable()}
    _, new_module, _ = prune_model(model, module, kept, spaces)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (new_module.eval()(x) - module(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["student.spec", "resnet18.spec"])
@pytest.mark.parametrize("rate,scope", [(0.75, "layer"), (0.5, "layer"), (0.3, "global")])
def test_pruned_models_run_match_their_spec_and_shrink(name, rate, scope):
    model, module = _trained_like(name)
    spaces = analyse_channels(model.root)
    new_model, new_module, text = prune_model(model, module, choose(importance(module, spaces, "bn"), rate, scope),
                                              spaces)
    recompiled = compiler.compile_source(text, "pruned.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    a = compiler.analyse(recompiled)
    got = measure(new_module, (3, 32, 32))
    assert got["params"] == a.params and got["macs"] == a.macs and got["output"] == (10,)
    assert a.params < compiler.analyse(model).params and a.macs < compiler.analyse(model).macs
    assert len(model_bytes(new_module, new_model, "fp32")) == compiler.predicted_bytes(recompiled, "fp32") \
        < compiler.predicted_bytes(model, "fp32")


def test_residual_branches_share_channels():
    model, _ = _trained_like("resnet18.spec")
    spaces = analyse_channels(model.root)
    by_path = {u.node.path: u for u in spaces.usages}
    # the stem's output, layer1's two block outputs are one space (identity shortcuts)
    stem = spaces.find(by_path["stem.0"].out)
    assert spaces.find(by_path["layer1.0.0.body.3"].out) == stem == spaces.find(by_path["layer1.1.0.body.3"].out)
    # a projection shortcut's conv joins its body's output space
    assert spaces.find(by_path["layer2.0.0.shortcut.0"].out) == spaces.find(by_path["layer2.0.0.body.3"].out)


@pytest.mark.slow
@needs_data
def test_tiny_prune_sweep_writes_csv_and_curve(tmp_path, capsys, in_root):
    from runtime.cli import main

    out = tmp_path / "run"
    code = main(["specs/student.spec", "--recipe", "prune_sweep", "--data", str(DATA),
                 "--set", "data.limit_per_class=30",
                 "--set", "steps.train.epochs=1", "--set", "steps.sweep.iterations=2", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = list(csv.DictReader((out / "steps/sweep/pruning_curve.csv").open()))
    assert {r["run"] for r in rows} == {"rate 0.95", "rate 0.9", "rate 0.85"} and len(rows) == 9
    finals = {r["run"]: int(r["params"]) for r in rows if r["iteration"] == "2"}
    assert finals["rate 0.85"] < finals["rate 0.9"] < finals["rate 0.95"] < int(rows[0]["params"])
    from PIL import Image

    img = Image.open(out / "steps/sweep/pruning_curve.png").convert("L")
    assert img.size[0] >= 400 and img.size[1] >= 300
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    assert (pixels < 128).float().mean() > 0.005  # lines, axes and text drawn, not a blank image
    report = json.loads((out / "report.json").read_text())
    final = report["steps"][-1]
    assert final["params"] == finals["rate 0.85"]  # the evaluated model is the pruned one
    pruned = compiler.compile_spec(out / "steps/sweep/pruned.spec", params={"classes": 10})
    assert compiler.analyse(pruned).params == final["params"]
    assert final["file_bytes"] == compiler.predicted_bytes(pruned, "fp32")


def test_round_to_multiple_and_target_macs():
    from runtime.rewrite.prune import shrink_to

    model, module = _trained_like("student.spec")
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, "bn")
    target = compiler.analyse(model).macs // 2
    rate = shrink_to(model, module, scores, "layer", "macs", target, multiple=8)
    kept = choose(scores, rate, "layer", multiple=8)
    assert all(len(idx) % 8 == 0 for idx in kept.values())
    new_model, _, _ = prune_model(model, module, kept, spaces)
    macs = compiler.analyse(new_model).macs
    assert macs <= target and macs > 0.4 * compiler.analyse(model).macs  # as close to half as the rounding allows


def test_rounding_keeps_multiples_and_leaves_a_space_of_one_multiple_whole():
    from runtime.rewrite.prune import _rounded

    assert [_rounded(k, 64, 16, 1) for k in (1, 20, 25, 64)] == [16, 16, 32, 64]
    assert _rounded(1, 16, 16, 1) == 16 and _rounded(3, 12, 16, 1) == 12  # one block or less: whole
    assert _rounded(1, 16, 1, 1) == 1 and _rounded(0, 16, 1, 2) == 2      # no multiple: the minimum only
    model, module = _trained_like("student.spec")  # base 16: the first conv's space is one block of 16
    spaces = analyse_channels(model.root)
    kept = choose(importance(module, spaces, "l1"), 0.1, "global", multiple=16)
    assert all(len(idx) % 16 == 0 for idx in kept.values()) and min(len(idx) for idx in kept.values()) == 16


def test_activation_cost_prunes_high_resolution_layers_harder():
    model, module = _trained_like("student.spec", input_shape=(3, 64, 64))
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, "l1")
    costs = {s: spaces.activations_per_channel(s) for s in scores}
    first = min(scores, key=lambda s: -costs[s])  # the most expensive space: the first conv's 64x64 outputs
    plain = choose(scores, 0.6, "global")
    aware = choose(scores, 0.6, "global", costs=costs, min_rate=0.25)
    assert len(aware[first]) < len(plain[first])
    assert all(len(aware[s]) >= 0.25 * spaces.size[s] for s in scores)
    # a huge power ranks by cost alone (it overflowed as cost**power): every layer costlier than the
    # (geometric) mean is cut to its minimum, and the cheaper ones keep more
    by_cost = choose(scores, 0.6, "global", costs=costs, min_rate=0.25, cost_power=1e300)
    mean_log = sum(math.log(c) for c in costs.values()) / len(costs)
    dear = [s for s in scores if math.log(costs[s]) > mean_log]
    assert dear and all(len(by_cost[s]) == math.ceil(0.25 * spaces.size[s]) for s in dear)
    assert sum(len(by_cost[s]) for s in scores if s not in dear) > sum(len(aware[s]) for s in scores if s not in dear)


def test_cost_needs_global_scope(capsys, in_root, tmp_path):
    from runtime.cli import main

    recipe = tmp_path / "p.yaml"
    recipe.write_text("name: p\nsteps:\n  - {name: t, kind: train}\n  - {name: p, kind: prune, cost: activations}\n")
    assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
    assert "needs `scope: global`" in capsys.readouterr().err


def test_pruned_spec_writes_a_parameter_only_where_the_spec_did(tmp_path):
    """A hidden `linear(10)` in a 10-class model stays `linear(10)`; `linear(classes)` stays symbolic."""
    spec = tmp_path / "hidden.spec"
    spec.write_text("model h(classes: int = 10, width: int = 16) {\n  input 3x16x16\n"
                    "  conv(width) bn relu conv(width) bn relu gap flatten\n"
                    "  hidden: linear(10) relu\n  fc: linear(classes)\n}\n")
    model = compiler.compile_spec(spec)
    module = compiler.build_module(model).eval()
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, "l1")
    _, _, kept_all = prune_model(model, module, choose(scores, 1.0, "layer"), spaces)
    assert "hidden: linear(10, " in kept_all and "fc: linear(classes, " in kept_all
    assert "conv(width, " in kept_all  # still the value the spec wrote: still the name
    _, _, halved = prune_model(model, module, choose(scores, 0.5, "layer"), spaces)
    assert "conv(width" not in halved and "conv(8, " in halved and "fc: linear(classes, " in halved


def test_epochs_reaches_fine_tuning_in_the_dry_run(capsys, in_root):
    from runtime.cli import main

    assert main(["specs/student.spec", "--recipe", "prune", "--epochs", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train student for 1 epoch(s)" in out and "train 1 epoch(s) after each" in out
    assert main(["specs/student.spec", "--recipe", "prune", "--epochs", "3", "--set", "steps.prune.finetune=null",
                 "--dry-run"]) == 0
    assert "after each" not in capsys.readouterr().out  # fine-tuning that is off stays off


def test_iterations_stop_when_nothing_is_left_to_prune(tmp_path, capsys, in_root):
    """Past the point where every layer is at its minimum an iteration would prune nothing and only
    fine-tune again: the step stops there and says so."""
    from runtime.cli import main

    out = tmp_path / "run"
    code = main(["specs/student.spec", "--recipe", "prune", "--epochs", "1", "--device", "cpu",
                 "--set", "data.limit_per_class=5", "--set", "steps.prune.rate=0.3",
                 "--set", "steps.prune.iterations=50", "--set", "steps.prune.latency=false",
                 "--set", "steps.prune.finetune=null", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = list(csv.DictReader((out / "steps/prune/pruning_curve.csv").open()))
    done = len(rows) - 1  # row 0 is the model before pruning
    assert 1 < done < 50 and f"stopping after {done} of 50 iteration(s)" in printed, printed
    assert int(rows[-1]["params"]) < int(rows[-2]["params"])  # the last iteration run still pruned something
    spaces = analyse_channels(compiler.compile_spec(out / "steps/prune/pruned.spec").root)
    assert all(spaces.size[s] == 1 for s in spaces.prunable())  # rate 0.3 drove every layer to min_channels


def test_a_pruning_target_out_of_reach_is_said():
    """At every layer's minimum a model can stay over its target (the channel block of a latency target,
    min_channels): the step says so, with what it reached, instead of passing it off as the target."""
    from runtime.steps.prune import Prune, PruneConfig

    model, module = _trained_like("student.spec")
    params = compiler.analyse(model).params
    said = []
    ctx = type("Ctx", (), {"log": staticmethod(said.append)})()
    Prune._say_if_short(PruneConfig(name="p", target_params=10), ctx, model, "prune", 8)
    assert len(said) == 1 and f"target_params 10 not reached: the pruned model has {params}" in said[0]
    assert "multiples of 8" in said[0]
    said.clear()
    Prune._say_if_short(PruneConfig(name="p", target_params=params), ctx, model, "prune", 8)
    Prune._say_if_short(PruneConfig(name="p", rate=0.5), ctx, model, "prune", 8)  # no target: nothing to say
    assert said == []
