"""Below 8 bits: quantization-aware training (runtime.quant.fakequant), calibrated rounding
(runtime.quant.calibrated), bits chosen for a budget (runtime.quant.autobits, compiler.rewrite.bitalloc) and the
kd_qat recipe."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import compiler
from compiler.fileformat import parse_format
from compiler.rewrite import bitalloc
from runtime.cli import main
from runtime.quant import autobits, calibrated, fakequant
from runtime.weights import ModelFile, save_model, state_tensors

from .conftest import DATA, SPECS
from .test_runtime import SMALL_TEACHER, needs_data

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device here"))]


def _student():
    return compiler.compile_spec(SPECS / "student.spec", params={"classes": 10}, input_shape=(3, 32, 32))


def _train_a_little(module, steps=4):
    opt = torch.optim.AdamW(module.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    for i in range(steps):
        if i == steps // 2:
            fakequant.freeze_batchnorm(module)
        loss = torch.nn.functional.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


@pytest.mark.parametrize("fmt, scales", [("int4", "learned"), ("int3-channel", "learned"), ("int2", "minmax"),
                                         ("fp16", "learned")])
def test_the_written_file_predicts_exactly_what_the_quantization_aware_model_did(tmp_path, fmt, scales):
    model = _student()
    wf = parse_format(fmt, overrides=[("fc.*", "int8"), ("features.1.*", "fp16"), ("features.4.pw.*", "int2")])
    module = compiler.build_module(model, seed=0)
    stored = len(state_tensors(module))
    assert fakequant.attach(module, model, wf, scales) == stored
    x = _train_a_little(module)
    module.eval()
    with torch.no_grad():
        trained = module(x)
    fakequant.bake(module)
    assert not any("parametrizations" in k for k in module.state_dict())
    path = tmp_path / "m.safetensors"
    assert save_model(module, model, path, wf) == compiler.predicted_bytes(model, wf)
    with torch.no_grad():
        written = ModelFile(path).build(model)(x)
    assert torch.equal(trained, written)


_OVERRIDES = [("fc.*", "int8"), ("features.1.*", "fp16"), ("features.4.pw.*", "int2")]


def _qat_student(fmt, scales, fused, channels_last, state=None):
    model = _student()
    module = compiler.build_module(model, seed=0)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    fakequant.attach(module, model, parse_format(fmt, overrides=_OVERRIDES), scales, fused=fused)
    if state is not None:
        module.load_state_dict(state)
    return module


def _one_step(module, eval_mode: bool, channels_last: bool = False):
    """(output, gradients, every parametrized tensor as the layers read it during the forward pass).
    `channels_last`: the batch too, as the training loop gives it, so both rounding paths run the network
    in one memory format (the per-tensor path hands the layers contiguous copies of the weights)."""
    from torch.nn.utils import parametrize

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    module.train(not eval_mode)
    seen, hooks = {}, []
    for name, owner in module.named_modules():
        if parametrize.is_parametrized(owner):
            def read(m, args, name=name):
                seen.update({f"{name}.{a}": getattr(m, a).detach().clone() for a in m.parametrizations})
            hooks.append(owner.register_forward_pre_hook(read))
    out = module(x)
    for h in hooks:
        h.remove()
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, seen


@pytest.mark.slow
@pytest.mark.parametrize("fmt, scales", [("int4", "learned"), ("int3-channel", "learned"), ("int2", "minmax")])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("trained", [False, True])
def test_rounding_all_tensors_in_one_pass_gives_the_per_tensor_values_and_gradients(fmt, scales, channels_last,
                                                                                     trained):
    state = None
    if trained:  # range ends moved off the weights' own min and max, some weights clipped
        warm = _qat_student(fmt, scales, False, channels_last)
        _train_a_little(warm, steps=4)
        state = warm.state_dict()
    for eval_mode in (False, True):  # eval: BatchNorm's statistics rounded too
        alone = _qat_student(fmt, scales, False, channels_last, state)
        fused = _qat_student(fmt, scales, True, channels_last, state)
        out_alone, grads_alone, seen_alone = _one_step(alone, eval_mode, channels_last)
        out_fused, grads_fused, seen_fused = _one_step(fused, eval_mode, channels_last)
        assert seen_alone.keys() == seen_fused.keys() and len(seen_alone) >= 48
        for name, value in seen_alone.items():  # the same rounded values, bit for bit
            assert torch.equal(value, seen_fused[name]), name
        assert torch.equal(out_alone, out_fused)
        assert grads_alone.keys() == grads_fused.keys()
        # the same gradients, up to the order of their sums (channels_last: also of the segment sums, which
        # run over each row in memory order); measured 4e-5 at most on a 2-core AMD EPYC, torch 2.14.1
        rtol, atol = (1e-3, 1e-4) if channels_last else (1e-4, 1e-5)
        for name, g in grads_alone.items():
            torch.testing.assert_close(grads_fused[name], g, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("zoo", ["mobilenet_v3_small", "regnet_x_400mf"])
def test_rounding_in_one_pass_matches_per_tensor_on_other_families(zoo):
    """Grouped convolutions, squeeze-excitation, dropout; in float64, where the order of sums cannot
    hide a wrong gradient (float32 cancellation in BatchNorm's constant rows can)."""
    model = compiler.compile_spec(SPECS / "zoo" / f"{zoo}.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    runs = []
    for fused in (False, True):
        module = compiler.build_module(model, seed=0).double().train()
        fakequant.attach(module, model, parse_format("int4-channel"), "learned", fused=fused)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        torch.manual_seed(1)  # the same dropout masks
        out = module(x)
        out.square().sum().backward()
        runs.append((out.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (out_alone, grads_alone), (out_fused, grads_fused) = runs
    assert torch.equal(out_alone, out_fused)
    assert grads_alone.keys() == grads_fused.keys()
    for name, g in grads_alone.items():
        torch.testing.assert_close(grads_fused[name], g, rtol=1e-7, atol=1e-12, msg=name)


def test_rounding_in_one_pass_costs_a_fixed_number_of_kernels_and_leaves_with_bake():
    from .measure import Dispatched

    views = ("view", "slice", "detach", "permute", "split", "alias", "_unsafe_view", "as_strided", "expand", "t.")
    counts = {}
    for fused in (False, True):
        module = _qat_student("int4", "learned", fused, False)
        with Dispatched() as d:
            _one_step(module, eval_mode=False)
        counts[fused] = sum(n for op, n in d.ops.items() if not any(f"aten.{v}" in op for v in views))
    plain = compiler.build_module(_student(), seed=0)
    with Dispatched() as d:
        _one_step(plain, eval_mode=False)
    base = sum(n for op, n in d.ops.items() if not any(f"aten.{v}" in op for v in views))
    tensors = 48  # parameters rounded in training (BatchNorm's statistics only in eval)
    assert counts[False] - base > 50 * tensors  # dozens of small kernels per tensor
    assert counts[True] - base < 300  # tens for all of them together (plus concatenation)
    module = _qat_student("int4", "learned", True, False)
    fakequant.bake(module)
    assert not module._forward_pre_hooks and not module._forward_hooks


def test_learned_ranges_train_and_clip():
    model = _student()
    module = compiler.build_module(model, seed=0)
    fakequant.attach(module, model, parse_format("int3"), "learned")
    before = {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith((".lo", ".hi"))}
    assert before
    _train_a_little(module, steps=6)
    moved = [n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "range ends get gradients (LSQ)"


def test_batchnorm_statistics_update_in_training_and_are_rounded_in_eval():
    model = _student()
    module = compiler.build_module(model, seed=0)
    fakequant.attach(module, model, parse_format("int2"), "learned")
    bn = module.get_submodule("features.1")
    raw = bn.parametrizations.running_mean.original
    start = raw.clone()
    module.train()
    module(torch.randn(8, 3, 32, 32) + 3)
    assert not torch.equal(raw, start), "training updates the running mean in place"
    bn.eval()
    assert len(torch.unique(bn.running_mean)) <= 4, "in eval mode it is seen on the 2-bit grid"


def _correlated_inputs(n=512, c=8):
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(c, c, generator=gen)
    return (torch.randn(n, c, 6, 6, generator=gen).permute(0, 2, 3, 1) @ mix).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("groups, fmt", [(1, "int3-channel"), (8, "int3"), (2, "int2-channel")])
def test_calibrated_rounding_beats_nearest_on_the_layer_output_and_is_written_exactly(tmp_path, groups, fmt):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(8, 16, 3, padding=1, groups=groups)
    net = torch.nn.Sequential(layer)
    x = _correlated_inputs()
    with torch.no_grad():
        want = layer(x)
    f = parse_format(fmt)
    rows = 16 if f.scheme == "channel" else 1
    from runtime.quant.codes import dequantize, quantize

    codes, r = quantize(layer.weight, f.bits, rows)
    nearest = dequantize(codes, r, f.bits).reshape(layer.weight.shape)
    ranges = calibrated.calibrate(net, parse_format(fmt), [x[:256], x[256:]])
    with torch.no_grad():
        err_cal = (layer(x) - want).pow(2).mean()
        err_rtn = (torch.nn.functional.conv2d(x, nearest, layer.bias, padding=1, groups=groups) - want).pow(2).mean()
    assert err_cal < 0.8 * err_rtn, (err_cal, err_rtn)
    # the file's codes with these ranges are exactly the calibrated weights
    codes2, r2 = quantize(layer.weight, f.bits, rows, ranges["0.weight"])
    assert torch.equal(r2, ranges["0.weight"])
    assert torch.allclose(dequantize(codes2, r2, f.bits).reshape(layer.weight.shape), layer.weight, atol=1e-6)


def test_knapsack_is_optimal_on_small_instances():
    rng = random.Random(0)
    for _ in range(30):
        items = [[(rng.randint(1, 40), rng.random()) for _ in range(rng.randint(1, 4))] for _ in range(4)]
        cap = rng.randint(10, 120)
        best = None
        for combo in itertools.product(*[range(len(o)) for o in items]):
            size = sum(items[i][k][0] for i, k in enumerate(combo))
            cost = sum(items[i][k][1] for i, k in enumerate(combo))
            if size <= cap and (best is None or cost < best - 1e-12):
                best = cost
        got = autobits.knapsack(items, cap)
        if best is None:
            assert got is None
        else:
            assert sum(items[i][k][0] for i, k in enumerate(got)) <= cap
            assert sum(items[i][k][1] for i, k in enumerate(got)) == pytest.approx(best)


def test_auto_choice_fits_the_budget_exactly_and_recompiles():
    model = _student()
    module = compiler.build_module(model, seed=0).eval()
    batches = [torch.randn(32, 3, 32, 32)]
    sens = autobits.sensitivity(module, model, batches, ("int2", "int4", "int8-channel", "fp16"))
    assert set(sens) == {layer.path for layer in bitalloc.layers(model)}
    assert all(s["int2"] >= 0 for s in sens.values())
    for budget in (90_000, 140_000):
        choice, text, chosen = autobits.choose(model, sens, budget, "test")
        size = compiler.predicted_bytes(chosen, "spec")
        assert size <= budget
        assert chosen.root.params == model.root.params
        again = compiler.compile_source(text, "again.spec")
        assert compiler.predicted_bytes(again, "spec") == size
    with pytest.raises(compiler.NcError, match="no choice of formats fits"):
        autobits.choose(model, sens, 50_000, "test")


def test_fp16_default_with_bit_packed_exceptions_reads_back(tmp_path):
    model = _student()
    module = compiler.build_module(model, seed=0)
    wf = parse_format("fp16", overrides=[("features.4.pw.*", "int2-channel"), ("fc.*", "int5")])
    path = tmp_path / "m.safetensors"
    assert save_model(module, model, path, wf) == compiler.predicted_bytes(model, wf)
    rebuilt = state_tensors(ModelFile(path).build(model))
    assert len(torch.unique(rebuilt["features.4.pw.weight"][0])) <= 4


QUANT_RECIPE = """
name: q
input: 3x32x32
data: {{limit_per_class: 5}}
steps:
  - {{name: t, kind: train, epochs: 1{extra}}}
  - {{name: q, kind: quantize, evaluate: false, {step}}}
"""


@pytest.mark.parametrize("step, extra, fragment", [
    ("format: auto", "", "format `auto` needs a byte budget"),
    ("format: auto, max_bytes: 1000", "", "no choice of formats fits 1,000 bytes"),
    ("format: auto, max_bytes: 90000, candidates: [int9]", "", "candidates: 'int9'"),
    ("format: int9", "", "unknown format `int9`"),
    ("format: int4, rounding: calibrated, fold_bn: true", "", "rounding `calibrated` works on the unfolded"),
    ("format: int4", ", quantize_aware: {format: int1}", "quantize_aware: unknown format `int1`"),
    ("format: int4", ", quantize_aware: {format: int4, formats: {'nope.*': int8}}", "'nope.*' match no tensor"),
    ("format: int4", ", quantize_aware: {format: int4, freeze_bn_epochs: 3}", "freeze_bn_epochs: 3 is more than"),
    ("format: int4", ", quantize_aware: {format: spec}", "format `spec` needs a `precision` section"),
    ("format: int4", ", quantize_aware: {format: int4, scales: lsq}", "scales"),
])
def test_bad_low_bit_settings_are_refused_before_any_training(tmp_path, capsys, in_root, step, extra, fragment):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(QUANT_RECIPE.format(step=step, extra=extra))
    assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("device", DEVICES)
def test_kd_qat_writes_a_predicted_file_under_150k_that_predicts_what_training_saw(tmp_path, capsys, in_root, device):
    teacher = tmp_path / "teacher.spec"
    teacher.write_text(SMALL_TEACHER)
    out = tmp_path / "run"
    code = main(["specs/student.spec", "--recipe", "kd_qat", "--data", str(DATA), "--epochs", "2", "--device", device,
                 "--set", "data.limit_per_class=20", "--set", f"models.teacher.spec={teacher}",
                 "--set", "steps.export.onnx=false", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    steps = {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}
    q = steps["quantize"]
    student = _student()
    predicted = compiler.predicted_bytes(student, "int4")
    assert q["file_bytes"] == predicted == (out / q["model_file"]).stat().st_size <= 150_000
    assert steps["distill"]["metrics"]["quantize_aware"]["format"] == "int4"
    # the dequantized file scores what the quantization-aware model scored in its best epoch
    assert q["val_accuracy"] == steps["distill"]["val_accuracy"]
    assert steps["evaluate"]["val_accuracy"] == q["val_accuracy"]
    # and makes the same predictions, image by image: the trained tensors rounded again give the file
    baked = ModelFile(out / steps["distill"]["model_file"]).build(student)
    fakequant.attach(baked, student, parse_format("int4"), "minmax")
    written = ModelFile(out / q["model_file"]).build(student)
    from runtime.data import list_source, load
    from runtime.data.transforms import Pipeline
    from runtime.recipe import DataConfig

    cfg = DataConfig(path=str(DATA), limit_per_class=20)
    x = Pipeline([], "eval", 3, (32, 32))(load(list_source(cfg), cfg, (3, 32, 32), 0).val.images)
    with torch.no_grad():
        assert torch.equal(baked.eval()(x).argmax(1), written(x).argmax(1))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_auto_and_calibrated_quantize_steps_run_and_write_the_chosen_spec(tmp_path, capsys, in_root, device):
    recipe = tmp_path / "a.yaml"
    recipe.write_text("name: a\ninput: 3x32x32\ndata: {limit_per_class: 10}\nsteps:\n"
                      "  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: q, kind: quantize, format: auto, max_bytes: 95000, rounding: calibrated,"
                      " calibration_images: 64, candidates: [int2, int3-channel, int4, int6, fp16]}\n"
                      "  - {name: e, kind: evaluate}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--device", device, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    steps = {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}
    q = steps["q"]
    spec = out / "steps/q/precision.spec"
    chosen = compiler.compile_spec(spec)
    assert chosen.definition.precision is not None
    assert q["file_bytes"] == compiler.predicted_bytes(chosen, "spec") <= 95_000
    assert q["metrics"]["calibrated_layers"] > 0 and "nearest_val_accuracy" in q["metrics"]
    assert set(q["metrics"]["auto"]["choice"].values()) <= {"int2", "int3-channel", "int4", "int6", "fp16"}
    assert steps["e"]["file_bytes"] == q["file_bytes"]  # the next steps use the chosen spec
    file = ModelFile(out / q["model_file"])
    def rules(m):
        p = m.definition.precision
        return p.default, [(r.pattern, r.format) for r in p.rules]

    assert rules(file.model()) == rules(chosen)
