"""Hostile and clumsy inputs: each is a clean error (exit 2, or 1 for budgets), never an internal
error, a hang or a write outside the run directory."""
from __future__ import annotations

import os
import time

import pytest
import torch

from runtime.cli import main

from .conftest import DATA

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def run(args, capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("make, fragment", [
    (lambda d: "/dev/urandom", "not a regular file"),
    (lambda d: str(d), "a folder; expected a spec file"),
    (lambda d: _write(d / "big.spec", "# " + "x" * 300_000 + "\nmodel m { input 3x8x8 relu }"),
     "larger than the 262,144-byte limit"),
    (lambda d: _write_bytes(d / "bin.spec", b"model \xff\xfe"), "not UTF-8 text"),
    (lambda d: _write(d / "bomb.yaml", ALIAS_BOMB), "aliases (*name) are not allowed"),
    (lambda d: _write(d / "neg.yaml", "model:\n  name: n\n  input: [-1, 100, 100]\n  layers: [relu]\n"),
     "every size must be at least 1"),
    (lambda d: _write(d / "ctl.yaml", "model: \x07\n"), "invalid YAML"),
    (lambda d: _write(d / "e.spec", ""), "e.spec:1:1: error: no model in this file"),
    (lambda d: _write(d / "c.spec", "# a comment\n"), "c.spec:1:1: error: no model in this file"),
])
def test_bad_spec_files(make, fragment, tmp_path, capsys):
    code, printed = run([make(tmp_path)], capsys)
    assert code == 2 and fragment in printed, printed
    assert "internal error" not in printed


@pytest.mark.parametrize("make, fragment", [
    (lambda d: "/dev/zero", "not a regular file"),
    (lambda d: _mkdir(d / "r.yaml"), "a folder; expected a recipe file"),
    (lambda d: _write_bytes(d / "bin.yaml", bytes(range(256)) * 4), "not UTF-8 text"),
    (lambda d: _write(d / "bomb.yaml", ALIAS_BOMB), "aliases (*name) are not allowed"),
    (lambda d: _write(d / "steps.yaml", "name: r\nsteps: 5\n"), "`steps` must be a list"),
    (lambda d: _write(d / "deep.yaml", "a: " + "[" * 5000 + "]" * 5000), "the YAML nests too deeply"),
])
def test_bad_recipe_files(make, fragment, tmp_path, capsys, in_root):
    code, printed = run(["specs/student.spec", "--recipe", make(tmp_path), "--dry-run"], capsys)
    assert code == 2 and fragment in printed, printed
    assert "internal error" not in printed


@pytest.mark.parametrize("make, fragment", [
    (lambda d: "/dev/zero", "not a regular file; expected a study file"),
    (lambda d: _mkdir(d / "s.yaml"), "a folder; expected a study file"),
    (lambda d: _write_bytes(d / "bin.yaml", bytes(range(256)) * 4), "not UTF-8 text"),
    (lambda d: _write(d / "bomb.yaml", ALIAS_BOMB), "aliases (*name) are not allowed"),
    (lambda d: _write(d / "deep.yaml", "[" * 5000 + "]" * 5000), "the YAML nests too deeply"),
    (lambda d: _write(d / "big.yaml", "# " + "x" * 300_000 + "\nname: s\n"), "larger than the 262,144-byte limit"),
    (lambda d: str(d / "none.yaml"), "no such study file"),
])
def test_bad_study_files(make, fragment, tmp_path, capsys):
    """A study file is read as a recipe is: a regular file, of bounded size, UTF-8, without aliases
    (it was read whole, and deep nesting or bad bytes were internal errors)."""
    code, printed = run(["study", make(tmp_path)], capsys)
    assert code == 2 and fragment in printed, printed
    assert "internal error" not in printed


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("5\n", "scalar")])
def test_a_yaml_spec_that_is_no_mapping_is_one_error(text, kind, tmp_path, capsys):
    code, printed = run([_write(tmp_path / "s.yaml", text)], capsys)
    assert code == 2 and printed.startswith(f"{tmp_path / 's.yaml'}:1:1: error: a spec file must be a mapping, "
                                            f"got a {kind}"), printed
    assert printed.count("error:") == 1, printed  # not also "no model in this file"


@pytest.mark.parametrize("text, message", [
    ("name: r\nsteps: 5\n", "`steps` must be a list of steps, got int"),
    ("name: r\n", "`steps` is required"),
    ("name: r\nsteps: []\n", "`steps`: a recipe needs at least one step"),
])
def test_a_recipe_without_a_list_of_steps_is_one_error(text, message, tmp_path, capsys, in_root):
    code, printed = run(["specs/student.spec", "--recipe", _write(tmp_path / "r.yaml", text), "--dry-run"], capsys)
    assert code == 2 and printed.strip() == f"{tmp_path / 'r.yaml'}: error: {message}", printed


def test_recipe_and_study_problems_print_one_line_each_at_their_file(tmp_path, capsys, in_root):
    """Like a spec's: `file: error: ...` per problem and a count, never under a second `nccompile: error:`."""
    recipe = _write(tmp_path / "r.yaml", "name: r\nsteps:\n  - kind: train\n    epochs: -1\n    bogus: 1\n")
    code, printed = run(["specs/student.spec", "--recipe", recipe, "--dry-run"], capsys)
    lines = printed.strip().splitlines()
    assert code == 2 and lines[-1] == "3 errors" and "nccompile: error" not in printed, printed
    assert all(line.startswith(f"{recipe}: error: ") for line in lines[:-1]), printed
    study = _write(tmp_path / "s.yaml", "name: s\nruns: 3\nbogus: 1\n")
    code, printed = run(["study", study], capsys)
    lines = printed.strip().splitlines()
    assert code == 2 and lines[-1] == "2 errors" and "nccompile: error" not in printed, printed
    assert all(line.startswith(f"{study}: error: ") for line in lines[:-1]), printed
    code, printed = run(["study", _write(tmp_path / "y.yaml", "runs: [\n")], capsys)
    assert code == 2 and printed.startswith(f"{tmp_path / 'y.yaml'}:2:1: error: invalid YAML: "), printed


def test_limits_are_configurable(tmp_path, capsys, monkeypatch):
    spec = _write(tmp_path / "m.spec", "model m { input 3x8x8 relu }\n")
    monkeypatch.setenv("NCCOMPILE_LIMIT_SPEC_BYTES", "10")
    code, printed = run([spec], capsys)
    assert code == 2 and "larger than the 10-byte limit" in printed
    monkeypatch.setenv("NCCOMPILE_LIMIT_SPEC_BYTES", "1000")
    assert run([spec], capsys)[0] == 0


def _one_model(path, body: str, input_shape: str = "3x8x8") -> str:
    """A spec file whose one model is `body` (line 3 onwards) at `input_shape`."""
    return _write(path, f"model {path.stem} {{\n    input {input_shape}\n    {body}\n}}\n")


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _write_bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _mkdir(path) -> str:
    os.makedirs(path)
    return str(path)


@pytest.mark.parametrize("body, fragment", [
    ("conv(divisible(16, 0))", "the divisor must be a positive integer"),
    ("conv(divisible(-100, 8))", "the value must be a positive number"),
    ("conv(int(1e309))", "not a finite number"),
    ("conv(int(1e300 * 1e300))", "not a finite number"),
    ("conv(99999999999 * 99999999999)", "too large"),
    ("conv(int(0.0 / 0.0 + 1))", "division by zero"),
])
def test_bad_arithmetic_is_a_spec_error_at_its_place(body, fragment, tmp_path, capsys):
    spec = _one_model(tmp_path / "e.spec", body)
    code, printed = run([spec], capsys)
    assert code == 2 and fragment in printed and "e.spec:3:" in printed, printed


@pytest.mark.parametrize("line, fragment", [
    ("budget params <= 1/0", "division by zero"),
    ("budget params <= true", "a budget limit must be a non-negative number"),
    ("budget params <= -5", "a budget limit must be a non-negative number"),
])
def test_budget_limits_go_through_the_diagnostics(line, fragment, tmp_path, capsys):
    spec = _one_model(tmp_path / "b.spec", f"{line}\n    conv(4)")
    code, printed = run([spec], capsys)
    assert code == 2 and fragment in printed and "b.spec:3:" in printed, printed


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_parameters_are_refused(value, tmp_path, capsys):
    spec = _write(tmp_path / "p.spec", "model p(mult: float = 1.0) {\n    input 3x8x8\n    conv(int(8 * mult))\n}\n")
    code, printed = run([spec, "--param", f"mult={value}"], capsys)
    assert code == 2 and "expects float" in printed, printed


def test_width_mult_must_be_a_number(tmp_path, capsys):
    spec = _write(tmp_path / "w.spec", "model w {\n    input 3x8x8\n    width_mult true\n    conv(8)\n}\n")
    code, printed = run([spec], capsys)
    assert code == 2 and "width_mult must be a positive number" in printed, printed


@pytest.mark.parametrize("body, fragment", [
    ("conv(8, padding=-1)", "padding must be at least 0"),
    ("maxpool(2, padding=-1)", "padding must be at least 0"),
    ("conv(8) bn(eps=-1.0)", "eps must be positive"),
    ("conv(8) bn(momentum=2.0)", "momentum must lie in [0, 1]"),
    ("training: conv(8)", "is an attribute of every torch module"),
    ("forward: conv(8)", "is an attribute of every torch module"),
])
def test_invalid_layer_arguments_and_labels(body, fragment, tmp_path, capsys):
    spec = _one_model(tmp_path / "l.spec", body)
    code, printed = run([spec], capsys)
    assert code == 2 and fragment in printed, printed


def test_every_elaboration_error_is_reported_at_once(tmp_path, capsys):
    """Errors independent of each other all come out in file order; a block's error once however often
    it is called; shape checks downstream of an error are skipped (they would only repeat it)."""
    spec = _write(tmp_path / "many.spec", """block b(c: int) {
  conv(c, padding=-1) relu
}
model m(classes: int = 10) {
  input 3x32x32
  budget params <= 1/0
  conv(2.5)
  b(8) b(8)
  dropout(2.0)
  residual { conv(32) }
  bn(eps=0.0)
  linear(0)
}
""")
    code, printed = run([spec], capsys)
    assert code == 2, printed
    expected = ["many.spec:2:11: error: padding must be at least 0", "many.spec:6:20: error: division by zero",
                "many.spec:7:8: error: argument `out` of `conv` expects int",
                "many.spec:9:11: error: dropout probability must be in [0, 1)",
                "many.spec:11:6: error: eps must be positive", "many.spec:12:10: error: `out` must be at least 1"]
    where = [printed.find(e) for e in expected]
    assert -1 not in where and where == sorted(where), printed
    assert "6 errors" in printed and printed.count("padding must be") == 1
    assert "residual:" not in printed  # its input shape is unknown after conv(2.5)


def test_duplicate_models_and_empty_inputs(tmp_path, capsys):
    twice = _write(tmp_path / "t.spec", "model m { input 3x8x8 relu }\nmodel m { input 3x8x8 relu }\n")
    code, printed = run([twice, "--model", "m"], capsys)
    assert code == 2 and "model `m` is defined twice" in printed
    zero = _write(tmp_path / "z.yaml", "model:\n  name: z\n  input: 0x0x0\n  layers: [relu]\n")
    code, printed = run([zero], capsys)
    assert code == 2 and "every size must be at least 1" in printed
    zero_dsl = _write(tmp_path / "z.spec", "model z { input 0x0x0 relu }\n")
    code, printed = run([zero_dsl], capsys)
    assert code == 2 and ("at least 1" in printed), printed
    dotted = _write(tmp_path / "d.yaml", "model:\n  name: d\n  input: 3x8x8\n  layers: [{relu: [], name: a.b}]\n")
    code, printed = run([dotted], capsys)
    assert code == 2 and "is not a name" in printed, printed


# --- data ---------------------------------------------------------------------------------

def _image_folder(root, files: dict[str, dict[str, object]]):
    """root/{train,val}/<class>/<name>: Pillow images, or raw bytes."""

    for split in ("train", "val"):
        for cls, items in files.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in items.items():
                if isinstance(content, bytes):
                    (folder / name).write_bytes(content)
                else:
                    content.save(folder / name)
    return root


def test_every_listed_image_format_decodes_and_16_bit_is_scaled(tmp_path):
    import numpy as np
    from PIL import Image

    from runtime.data import list_source, load
    from runtime.recipe import DataConfig

    white16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    gray = Image.new("RGB", (8, 8), (128, 128, 128))
    root = _image_folder(tmp_path / "d", {"a": {"x.png": white16, "y.bmp": gray},
                                          "b": {"z.tif": gray, "w.tiff": gray, "v.gif": gray.convert("P")}})
    cfg = DataConfig(path=str(root), cache=False)
    data = load(list_source(cfg), cfg, (3, 8, 8), 0)
    assert data.train.images.dtype == torch.uint8 and len(data.train) == 5
    by_id = dict(zip(data.train.ids, data.train.images))
    assert int(by_id["x"].min()) == 255  # 65535 in 16 bits is white, not 255/65535 of it
    assert all(int(by_id[i].float().mean().round()) == 128 for i in ("y", "z", "w", "v"))


def test_empty_image_files_follow_on_bad_image(tmp_path):
    from PIL import Image

    from runtime.data import DataError, list_source, load
    from runtime.recipe import DataConfig

    ok = Image.new("RGB", (8, 8), (1, 2, 3))
    root = _image_folder(tmp_path / "d", {"a": {"0.jpg": ok, "1.jpg": b""}, "b": {"0.jpg": ok}})
    cfg = DataConfig(path=str(root), cache=False)
    with pytest.raises(DataError, match="1.jpg: cannot decode image"):
        load(list_source(cfg), cfg, (3, 8, 8), 0)
    cfg = DataConfig(path=str(root), cache=False, on_bad_image="skip")
    data = load(list_source(cfg), cfg, (3, 8, 8), 0)
    assert len(data.train) == 2 and len(data.skipped) == 2


def test_a_broken_image_is_named_with_the_decoder_reason_not_its_source_file(tmp_path, capsys, in_root):
    from PIL import Image

    root = _image_folder(tmp_path / "d", {"a": {"0.png": Image.new("RGB", (8, 8))},
                                          "b": {"0.png": Image.new("RGB", (8, 8))}})
    for split in ("train", "val"):
        (root / split / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    code, printed = run(["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--data", str(root),
                         "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "bad.png: cannot decode image (" in printed, printed
    assert ".cpp" not in printed


def test_a_single_class_is_refused_unless_allowed(tmp_path):
    from PIL import Image

    from runtime.data import DataError, list_source
    from runtime.recipe import DataConfig

    root = _image_folder(tmp_path / "d", {"only": {"0.jpg": Image.new("RGB", (8, 8))}})
    with pytest.raises(DataError, match="1 class"):
        list_source(DataConfig(path=str(root)))
    assert list_source(DataConfig(path=str(root), allow_single_class=True)).classes == ["only"]


def test_food11_labels_must_be_class_indices(tmp_path):
    from runtime.data import DataError, list_source
    from runtime.recipe import DataConfig

    for split in ("training", "validation"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "0_0.jpg").write_bytes(b"x")
        (tmp_path / split / "99999999999_0.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a class index"):
        list_source(DataConfig(path=str(tmp_path)))


def test_one_split_given_as_the_data_points_to_the_folder_above(tmp_path):
    from runtime.data import DataError, list_source
    from runtime.recipe import DataConfig

    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=f"one split of a data set; give the folder above it, {tmp_path.resolve()}"):
        list_source(DataConfig(path=str(tmp_path / "train")))


def test_transform_errors_keep_the_recipe_index_and_come_with_the_plan_errors(tmp_path, capsys, in_root):
    """The built-in digits are not mirror-symmetric, so kd_wq's flip (item 0) is left out: the crop is
    still item 1. Problems in both pipelines and in the steps are said at once."""
    code, printed = run(["specs/student.spec", "--recipe", "kd_wq", "--set", "transforms.train.1.crop.size=1000",
                         "--set", "transforms.eval=[{bogus: 1}]", "--set", "steps.distill.teacher=nobody",
                         "--dry-run"], capsys)
    assert code == 2, printed
    assert "kd_wq.yaml: error: `transforms.train[1]` (crop): a 1000x1000 crop does not fit" in printed
    assert "kd_wq.yaml: error: `transforms.eval[0]`: unknown transform `bogus`" in printed
    assert "kd_wq.yaml: error: step `distill` needs model `nobody`" in printed and "3 errors" in printed


@pytest.mark.parametrize("override, fragment", [
    ("data.val_fraction=0.999", "leaves no training images"),
    ("data.name=__loader__", "torchvision has no dataset `__loader__`"),
    ("data.name=ImageFolder", "use --data PATH"),
])
def test_data_settings_that_cannot_work(override, fragment, tmp_path, capsys, in_root):
    source = ["--set", "data.source=torchvision", "--set", "data.root=/nonexistent"] if "name=" in override else []
    code, printed = run(["specs/student.spec", "--recipe", "scratch", "--epochs", "1", *source, "--set", override,
                         "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and fragment in printed, printed


# --- untrusted model files and runaway specs -------------------------------------------------

def _forged(tmp_path, spec_text: str):
    """A real small model file whose embedded spec is replaced by `spec_text`."""
    import json

    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    import compiler
    from runtime.weights import save_model

    spec = tmp_path / "small.spec"
    spec.write_text("model small { input 3x8x8 conv(4) gap flatten linear(2) }\n")
    model = compiler.compile_spec(spec)
    path = tmp_path / "real.safetensors"
    save_model(compiler.build_module(model), model, path, "int8")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["spec"] = spec_text
    meta["model"] = json.loads(json.dumps("forged"))
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(st_save(load_file(path), metadata=meta))
    return str(forged)


@pytest.mark.parametrize("spec_text, fragment", [
    ("model forged { input 3x8x8 conv(4) gap flatten linear(150000000) }", "do not match its embedded spec"),
    ("model forged { input 3x8x8 identity x 100000000 }", "over the limit of 10,000"),
    ("model forged { input 3x8x8 torchvision resnet18(num_classes=2) }", "torchvision model"),
])
def test_load_refuses_a_forged_model_file_before_building(spec_text, fragment, tmp_path, capsys):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, printed = run(["load", _forged(tmp_path, spec_text)], capsys)
    assert code == 2 and fragment in printed, printed
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big was built


@pytest.mark.parametrize("body, fragment", [
    ("identity x 1000000000", "over the limit of 10,000"),
    ("{ { relu x 1000 } x 1000 } x 1000", "more than 100,000 layers"),
    ("torchvision fasterrcnn_resnet50_fpn()", "no classification model"),
    ("torchvision resnet18(weights_backbone=1)", "never names pretrained weights"),
    ("torchvision resnet18(num_classes=-3)", "num_classes must be at least 1"),
    ("torchvision vit_b_16(num_classes=10)", "cannot take a 3x32x32 input: AssertionError: Wrong image height"),
    ("torchvision googlenet(num_classes=10)", "returns GoogLeNetOutputs (in training), not one logits tensor"),
])
def test_runaway_specs_stop_at_their_limits(body, fragment, tmp_path, capsys):
    spec = _one_model(tmp_path / "r.spec", body, "3x32x32")
    code, printed = run([spec], capsys)
    assert code == 2 and fragment in printed, printed


@pytest.mark.parametrize("text, fragment", [
    ("model n { input 3x8x8 " + "{ " * 245 + "relu" + " }" * 245 + " }", "nesting deeper than 100 levels"),
    ("model n { input 3x8x8 conv(" + "-" * 300 + "8) }", "nesting deeper than 100 levels"),
    ("model n { input 3x8x8 conv(8 - 1 - 1 - 1) " * 1 + " }", None),  # binary minus signs are not nesting
])
def test_deep_nesting_is_an_error_with_a_position(text, fragment, tmp_path, capsys):
    code, printed = run([_write(tmp_path / "n.spec", text)], capsys)
    if fragment is None:
        assert code == 0, printed
    else:
        assert code == 2 and fragment in printed and "n.spec:1:" in printed, printed


def test_deeply_nested_yaml_is_a_clean_error(tmp_path, capsys):
    spec = _write(tmp_path / "n.yaml", "model:\n  name: n\n  input: 3x8x8\n  layers: " + "[" * 5000 + "]" * 5000 + "\n")
    code, printed = run([spec], capsys)
    assert code == 2 and "internal error" not in printed, printed


@pytest.mark.parametrize("args, fragment", [
    (["--input", ""], "--input is empty (an unset variable?)"),
    # empty values once meant the default: `--data ""` trained on digits, `--recipe ""` trained nothing
    (["--recipe", ""], "--recipe is empty"),
    (["--model", "studnet"], "has no model `studnet` (it defines student); did you mean `student`?"),
    (["--recipe", "kd", "--data", "", "--dry-run"], "--data is empty"),
    (["--recipe", "kd", "--set", "", "--dry-run"], "--set is empty"),
    (["--recipe", "scratch", "--set", "steps.train=5", "--dry-run"], "is a list; address a field"),
    (["--recipe", "kd_wq", "--set", "steps.export.opset=1", "--dry-run"], "opset"),
    (["--recipe", "kd", "--set", "models.teacher.torchvision_weights=IMAGENET9K", "--dry-run"],
     "no weights `IMAGENET9K`"),
    (["--recipe", "kd_wq", "--set", "optimizer.lr=.inf", "--dry-run"], "`optimizer.lr`: Input should be a finite"),
    (["--recipe", "kd_wq", "--set", "steps.distill.temperature=nan", "--dry-run"],
     "`steps[1] (distill).temperature`: Input should be a finite number"),
    (["--recipe", "kd_wq", "--set", "models.teacher.params.classes=.nan", "--dry-run"],
     "`models.teacher.params.classes`: Input should be a valid boolean or a finite number (got nan)"),
    (["--recipe", "prune", "--set", "steps.prune.finetune.lr=.inf", "--dry-run"],
     "finetune.lr`: Input should be a finite"),
    (["--recipe", "kd_wq", "--set", "transforms.eval.0.flip=1", "--dry-run"],
     "`transforms.eval` has no item `0` (it has 0, addressed by index from 0)"),
    (["--recipe", "kd_wq", "--epochs", "0", "--dry-run"], "--epochs must be at least 1, got 0"),
    (["--depth", "-1"], "--depth must be at least 0, got -1"),
    (["--recipe", "scratch", "--input", "3x100000x100000", "--dry-run"],
     "the training input 3x100000x100000 is over the limit of 67,108,864 pixels"),
    (["--recipe", "kd_wq", "--set", "steps.distill.temperature=1.0e+300", "--dry-run"],
     "`steps[1] (distill).temperature`: Input should be less than or equal to 1000"),
    (["--recipe", "prune", "--set", "steps.prune.finetune.kind=distill", "--set",
      "steps.prune.finetune.temperature=1.0e-300", "--dry-run"], "Input should be greater than or equal to 0.01"),
    (["--recipe", "kd_wq", "--set", "seed=100000000000000000000", "--dry-run"],
     "`seed`: Input should be less than 4294967296"),
    (["--recipe", "kd_wq", "--set", "seed=-1", "--dry-run"], "`seed`: Input should be greater than or equal to 0"),
])
def test_bad_command_lines(args, fragment, capsys, in_root):
    code, printed = run(["specs/student.spec", *args], capsys)
    assert code == 2 and fragment in printed, printed


def test_a_damaged_state_file_is_a_clear_error(tmp_path, capsys, in_root):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text("{not json")
    code, printed = run(["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--out", str(out)], capsys)
    assert code == 2 and "state.json is damaged" in printed, printed
    assert (out / "state.json").read_text() == "{not json"  # nothing lost


def test_a_model_file_with_non_finite_ranges_is_refused(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    _forged(tmp_path, "model forged { input 3x8x8 relu }")
    good = str(tmp_path / "real.safetensors")  # the unforged file the helper wrote first
    assert run(["load", good], capsys)[0] == 0
    tensors = load_file(good)
    tensors["nccompile.ranges"][0, 0] = float("nan")
    with safe_open(good, framework="pt") as f:
        meta = f.metadata()
    bad = tmp_path / "nan.safetensors"
    bad.write_bytes(st_save(tensors, metadata=meta))
    code, printed = run(["load", str(bad)], capsys)
    assert code == 2 and "not finite" in printed, printed


def test_load_survives_a_renamed_metadata_key(tmp_path, capsys):
    """Found by the fuzzer: one flipped byte renamed `quant` in the header, and load crashed."""
    _forged(tmp_path, "model forged { input 3x8x8 relu }")
    data = (tmp_path / "real.safetensors").read_bytes().replace(b'"quant"', b'"quan!"', 1)
    bad = tmp_path / "renamed.safetensors"
    bad.write_bytes(data)
    code, printed = run(["load", str(bad)], capsys)
    assert code in (0, 2) and "internal error" not in printed, printed


@pytest.mark.slow
def test_a_damaged_checkpoint_restarts_its_step(tmp_path, capsys, in_root):
    out = tmp_path / "run"
    args = ["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--device", "cpu",
            "--set", "data.limit_per_class=5", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    (out / "state.json").write_text('{"steps": {}}')  # as killed in its step: no step finished, checkpoints kept
    (out / "steps/train/last.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    code, printed = run(args, capsys)
    assert code == 0 and "cannot resume from" in printed and "starting this step over" in printed, printed


def test_yaml_keys_given_twice_are_errors(tmp_path, capsys):
    spec = _write(tmp_path / "d.yaml", "model:\n  name: a\n  input: 3x8x8\n  input: 3x9x9\n  layers: [relu]\n")
    code, printed = run([spec], capsys)
    assert code == 2 and "`input` appears twice" in printed, printed


def test_projection_of_a_huge_input_is_computed_not_searched(tmp_path, capsys):
    spec = _write(tmp_path / "p.spec", "model p {\n    input 3x8x8\n    residual project { conv(8, stride=2) }\n}\n")
    start = time.perf_counter()
    code, printed = run([spec, "--input", "3x1000000000x1"], capsys)
    assert code in (0, 1, 2) and time.perf_counter() - start < 10 and "internal error" not in printed, printed
    assert run([spec], capsys)[0] == 0  # and the ordinary case still projects with stride 2


@pytest.mark.parametrize("model_lines, fragments", [
    ("  name: {a: 1}\n  input: 3x8x8\n  layers: [relu]\n", ["`name` must be a plain value, got a mapping"]),
    ("  name: '017'\n  input: 3x8x8\n  layers: [relu]\n", ["model name `017` is not a name"]),
    ("  name: m\n  input: 3x8x8\n  layers:\n    - residual: [relu]\n      project: {a: 1}\n",
     ["`project` must be true or false"]),
    ("  name: m\n  input: 3x8x8\n  layers:\n    - {relu: [], name: [x]}\n", ["`name` must be a plain value"]),
    ("  name: m\n  input: 3x8x8\n  layers:\n    - {conv: [8], repeat: .nan}\n    - {conv: [017]}\n"
     "    - {conv: [1:30]}\n", ["`.nan` is not a number", "`017` is not a number", "`1:30` is not a number"]),
])
def test_yaml_scalars_of_the_wrong_kind(model_lines, fragments, tmp_path, capsys):
    code, printed = run([_write(tmp_path / "s.yaml", "model:\n" + model_lines)], capsys)
    assert code == 2 and all(f in printed for f in fragments) and "internal error" not in printed, printed


def test_a_round_to_that_prunes_nothing_is_refused(capsys, in_root):
    code, printed = run(["specs/student.spec", "--recipe", "prune", "--set", "steps.prune.round_to=1000000",
                         "--dry-run"], capsys)
    assert code == 2 and "round_to=1000000 is not below the widest prunable layer" in printed, printed


def test_an_xz_bomb_stops_at_the_size_its_header_declares(tmp_path, capsys):
    import json
    import lzma
    import resource

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    packer = lzma.LZMACompressor(preset=1)  # 300 MB past its declared end, never held in memory
    parts = [packer.compress(len(header).to_bytes(8, "little") + header + bytes(8))]
    zeros = bytes(10_000_000)
    parts += [packer.compress(zeros) for _ in range(30)] + [packer.flush()]
    bomb = tmp_path / "bomb.safetensors.xz"
    bomb.write_bytes(b"".join(parts))
    assert bomb.stat().st_size < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, printed = run(["load", str(bomb)], capsys)
    assert code == 2 and "more data than its header declares" in printed, printed
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_images_over_the_pixel_limit_follow_on_bad_image(tmp_path, monkeypatch):
    from PIL import Image

    from runtime.data import DataError, list_source, load
    from runtime.recipe import DataConfig

    small, large = Image.new("RGB", (8, 8)), Image.new("RGB", (64, 64))
    root = _image_folder(tmp_path / "d", {"a": {"0.png": small, "1.png": large}, "b": {"0.jpg": small}})
    monkeypatch.setenv("NCCOMPILE_LIMIT_IMAGE_PIXELS", "1000")
    cfg = DataConfig(path=str(root), cache=False)
    with pytest.raises(DataError, match="64x64 = 4,096 pixels, over the limit of 1,000"):
        load(list_source(cfg), cfg, (3, 8, 8), 0)
    cfg = DataConfig(path=str(root), cache=False, on_bad_image="skip")
    data = load(list_source(cfg), cfg, (3, 8, 8), 0)
    assert len(data.train) == 2 and any(p.endswith("1.png") for p in data.skipped)


HUGE = "9" * 5000  # Python refuses int() of 4,300 digits or more


@pytest.mark.parametrize("where, make, fragment", [
    ("a layer argument", lambda d: [_one_model(d / "a.spec", f"conv({HUGE})")], "too large (2^63 or more)"),
    ("the input line", lambda d: [_one_model(d / "b.spec", "relu", f"3x{HUGE}x8")], "below 2^63"),
    ("a YAML spec", lambda d: [_write(d / "c.yaml",
                                      f"model:\n  name: c\n  input: [3, 8, 8]\n  layers: [{{conv: {HUGE}}}]\n")],
     "is not a number nccompile reads"),
    ("a recipe", lambda d: ["specs/student.spec", "--dry-run", "--recipe",
                            _write(d / "r.yaml", f"name: r\nsteps: [{{name: t, kind: train, epochs: {HUGE}}}]\n")],
     "r.yaml:2:40: error: invalid YAML: an integer of 5,000 digits is too large"),
    ("--set", lambda d: ["specs/student.spec", "--recipe", "scratch", "--dry-run", "--set", f"data.batch_size={HUGE}"],
     "(4,802 characters)"),
])
def test_integers_of_thousands_of_digits(where, make, fragment, tmp_path, capsys, in_root):
    code, printed = run(make(tmp_path), capsys)
    assert code == 2 and fragment in printed, (where, printed[:3000])
    assert len(printed) < 3000, "errors echo at most a window of a huge value"


@pytest.mark.skipif(not DATA.is_dir(), reason="real images not found")
def test_weights_poisoned_by_one_step_are_never_saved(tmp_path, capsys, in_root):
    """One batch at a learning rate and weight decay that overflow float32 (an infinite one is refused
    up front): its loss was finite, the weights after it are not."""
    out = tmp_path / "run"
    code, printed = run(["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--device", "cpu",
                         "--data", str(DATA), "--set", "data.limit_per_class=5", "--set", "optimizer.lr=1e38",
                         "--set", "optimizer.weight_decay=1e10",
                         "--out", str(out)], capsys)
    assert code == 2 and "the weights' values became NaN or infinite in epoch 1" in printed, printed[-2000:]
    assert not list(out.glob("steps/train/*.safetensors"))


def test_a_reader_that_goes_away_is_no_internal_error(in_root):
    """`nccompile big.spec | head -1`: the pipe closes while the table is printed."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "runtime", "specs/zoo/densenet121.spec"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141) and "internal error" not in err and "Traceback" not in err, err


@pytest.mark.slow
def test_out_must_be_new_empty_or_a_run_of_its_own(tmp_path, capsys, in_root):
    """A folder with a user's own files (a recipe.yaml a run would overwrite) is refused, untouched."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("my own recipe\n")
    (mine / "notes.txt").write_text("notes\n")
    args = ["specs/student.spec", "--recipe", "kd_wq", "--epochs", "1", "--set", "data.limit_per_class=5"]
    code, printed = run([*args, "--out", str(mine)], capsys)
    assert code == 2 and f"--out {mine} holds files that no nccompile run wrote (notes.txt, recipe.yaml)" in printed
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "recipe.yaml"]
    assert (mine / "recipe.yaml").read_text() == "my own recipe\n"
    code, printed = run(["study", "specs/studies/q4_quantization.yaml", "--out", str(mine)], capsys)
    assert code == 2 and "holds files that no nccompile study wrote (notes.txt, recipe.yaml)" in printed, printed
    (mine / "notes.txt").unlink()  # names a run writes, but no record of one: still the user's
    code, printed = run([*args, "--out", str(mine)], capsys)
    assert code == 2 and "holds files that no nccompile run wrote (recipe.yaml)" in printed, printed
    assert sorted(p.name for p in mine.iterdir()) == ["recipe.yaml"]
    assert (mine / "recipe.yaml").read_text() == "my own recipe\n"
    # a run's own folder, with a temporary file a killed write left, resumes
    run_dir = tmp_path / "run"
    one_step = [*args, "--set", "steps=[{name: t, kind: train, model: student}]", "--out", str(run_dir)]
    assert run(one_step, capsys)[0] == 0
    (run_dir / ".report.json.x1.tmp").write_text("")
    code, printed = run(one_step, capsys)
    assert code == 0 and "already done" in printed, printed


@pytest.mark.parametrize("command", [["specs/student.spec", "--recipe", "kd_wq", "--epochs", "1"],
                                     ["study", "specs/studies/q4_quantization.yaml"]])
def test_out_that_is_a_file_or_empty_is_a_usage_error(command, tmp_path, capsys, in_root):
    """A study's --out /dev/null was an internal error (FileExistsError); an empty --out ran a whole
    study into the default folder."""
    target = tmp_path / "file"
    target.write_text("keep me")
    for out, fragment in ((str(target), "is a file, not a folder"), ("/dev/null", "is a file, not a folder"),
                          ("", "--out is empty (an unset variable?)")):
        code, printed = run([*command, "--out", out], capsys)
        assert code == 2 and fragment in printed and "internal error" not in printed, printed
    assert target.read_text() == "keep me"


@pytest.mark.slow
def test_calibration_batches_stop_at_the_training_set(tmp_path, capsys, in_root):
    """A huge `calibration_batches` looped over every batch index it allowed (a hang); only the
    batches the training set has are made."""
    recipe = _write(tmp_path / "q.yaml", "name: q\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                    "  - {name: q, kind: quantize, format: int8, integer_inference: true, evaluate: false,\n"
                    "     calibration_batches: 1000000000000}\n")
    code, printed = run(["specs/student.spec", "--recipe", recipe, "--device", "cpu", "--input", "3x16x16",
                         "--set", "data.limit_per_class=5", "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and "q: int8 in ONNX Runtime" in printed, printed[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("data", [[], pytest.param(["--data", str(DATA), "--set", "data.cache=false"],
                                                   marks=pytest.mark.skipif(not DATA.is_dir(), reason="no images"))])
def test_a_one_pixel_input_trains(data, tmp_path, capsys, in_root):
    """`--input 3x1x1` was an internal error: PyTorch's uint8 antialiased resize fails an assert at 1x1."""
    import torch

    from runtime.data.decode import resize

    spec = _write(tmp_path / "p.spec", "model p(classes: int = 10) { input 3x8x8 conv(4) bn relu gap flatten "
                                      "linear(classes) }\n")
    code, printed = run([spec, "--recipe", "scratch", "--epochs", "1", "--input", "3x1x1", *data,
                         "--set", "data.limit_per_class=3", "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and "train epoch 1/1" in printed, printed[-2000:]
    from torchvision.transforms.v2 import functional as F

    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    one = resize(images, (1, 1))
    per_channel = torch.cat([F.resize(images[:, c:c + 1], [1, 1], antialias=True) for c in range(3)], 1)
    assert one.dtype == torch.uint8 and (one.int() - per_channel.int()).abs().max() <= 1  # the kernel works per channel


def test_image_channels_follow_the_model_gray_rgb_and_alpha(tmp_path, capsys, in_root):
    """A 4-channel model trained on four copies of the gray image (colour dropped without a word);
    now 2 and 4 channels are gray + alpha and RGBA, from files and in conversions, and other
    channel counts are refused before any work."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from runtime.data import list_source, load, to_shape
    from runtime.recipe import DataConfig

    rng = np.random.default_rng(0)
    pixels = {}
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
            Image.fromarray(rgba, "RGBA").save(tmp_path / split / cls / "0.png")
            pixels[(split, cls)] = torch.from_numpy(rgba).permute(2, 0, 1)
    cfg = DataConfig(path=str(tmp_path), cache=False)
    data = load(list_source(cfg), cfg, (4, 6, 6), 0)
    assert sorted(map(tuple, data.train.images.tolist())) == sorted(
        tuple(pixels[("train", c)].tolist()) for c in ("a", "b"))  # colour and alpha as in the files
    gray = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    rgb = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    opaque = torch.full_like(gray, 255)
    assert torch.equal(to_shape(gray, 4, (5, 5)), torch.cat([gray.expand(-1, 3, -1, -1), opaque], 1))
    assert torch.equal(to_shape(torch.cat([rgb, gray], 1), 2, (5, 5)), torch.cat([F.rgb_to_grayscale(rgb), gray], 1))
    assert torch.equal(to_shape(torch.cat([rgb, gray], 1), 3, (5, 5)), rgb)
    code, printed = run(["specs/student.spec", "--recipe", "scratch", "--input", "5x32x32", "--dry-run"], capsys)
    assert code == 2 and "the model's input has 5 channels, and images have 1 (gray)" in printed, printed


def test_images_that_cannot_fit_in_memory_are_refused_before_any_work(tmp_path, capsys, in_root, monkeypatch):
    """Digits at 3x4000x4000 were an internal error (a 86 GB allocation) once the first step decoded
    them; an allocation that fails later is the machine's limit, said as such, not a bug report."""
    from runtime.data import DataError, check_memory, list_source
    from runtime.recipe import DataConfig

    cfg = DataConfig()
    with pytest.raises(DataError, match=r"scikit-learn digits .* at 3x20000x20000 takes 4,312.8 GB decoded, more than"):
        check_memory(list_source(cfg), cfg, (3, 20_000, 20_000))
    check_memory(list_source(cfg), cfg, (3, 32, 32))  # 11 MB: fine

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 86256000000 bytes")

    monkeypatch.setattr("runtime.run.runner.prepare", no_memory)
    code, printed = run(["specs/student.spec", "--recipe", "scratch", "--dry-run"], capsys)
    assert code == 2 and printed.startswith("nccompile: error: out of memory (") and "internal error" not in printed


CHAIN = "+".join(["1"] * 20_000)


@pytest.mark.parametrize("name, text, place, fragment", [
    # a long flat chain of operators nests as deep as it is long: it was a RecursionError
    ("chain.spec", f"model m {{\n  input 3x8x8\n  conv({CHAIN}) gap flatten linear(2)\n}}\n", ":3:8:",
     "an expression nests more than 100 operators"),
    ("chain.yaml", f'model:\n  name: m\n  input: 3x8x8\n  layers:\n    - conv: "{CHAIN}"\n    - gap\n', ":5:13:",
     "an expression nests more than 100 operators"),
    # a float range whose step count overflows: it was an OverflowError in compiler/space.py
    ("range.spec", "model m(w: float = 0.5 in 0.0..1e308 step 1e-308) {\n  input 3x8x8\n  conv(8) gap\n}\n",
     ":1:43:", "holds more than 2^63 values"),
    ("range.spec", "model m(w: float = 0.5 in -1e308..1e308 step 1.0) {\n  input 3x8x8\n  conv(8) gap\n}\n",
     ":1:", "holds more than 2^63 values"),
    # a mapping under `torchvision:`: it was a pydantic dump of parser internals
    ("tv.yaml", "model:\n  name: m\n  input: 3x32x32\n  layers:\n    - torchvision: {name: resnet18, bogus: 1}\n",
     ":5:20:", "`torchvision` takes a model name, got a mapping"),
    # the last one silently won
    ("two.spec", "model m {\n  input 3x8x8\n  input 3x16x16\n  conv(8) gap\n}\n", ":3:3:",
     "a model has one `input` line"),
    ("two.spec", "model m {\n  input 3x8x8\n  width_mult 0.5\n  width_mult 2.0\n  conv(8) gap\n}\n", ":4:3:",
     "a model has one `width` line"),
    ("prec.spec", 'model m {\n  input 3x8x8\n  conv(8) gap flatten\n  fc: linear(2)\n'
                  '  precision int8 { "fc": fp16, "fc": int4 }\n}\n', ":5:32:", "`precision` names `fc` twice"),
])
@pytest.mark.parametrize("command", [[], ["search"]])
def test_hostile_specs_are_errors_at_their_place(name, text, place, fragment, command, tmp_path, capsys):
    path = _write(tmp_path / name, text)
    code, printed = run([*command, path], capsys)
    assert code == 2 and f"{name}{place}" in printed and fragment in printed, printed[-2000:]
    assert "internal error" not in printed


def test_fifty_operators_in_a_row_still_compile(tmp_path, capsys):
    code, printed = run([_write(tmp_path / "ok.spec", "model m {\n  input 3x8x8\n  conv(" + "+".join(["1"] * 50)
                                + ") gap flatten linear(2)\n}\n")], capsys)
    assert code == 0 and "Params:" in printed, printed


def test_a_ctrl_c_that_a_library_turns_into_another_exception_is_still_an_interrupt(in_root):
    """Python wraps a KeyboardInterrupt raised in a descriptor's __set_name__ (platform.py's uname_result
    has one) in a RuntimeError; the CLI tells it from a bug by its Ctrl-C handler having fired."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "from runtime import cli, ctrl_c\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal, even under `&`
        "ctrl_c.install()\n"
        "class Interrupting:\n"
        "    def __set_name__(self, owner, name):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        for _ in range(10**6): pass\n"
        "def run(argv):\n"
        "    class Half:\n"
        "        attr = Interrupting()\n"
        "cli.run = run\n"
        "sys.exit(cli.main(['x.spec']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and "nccompile: interrupted" in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_ctrl_c_inside_the_import_of_torch_waits_for_the_import_to_end(in_root, tmp_path):
    """torch's C++ start-up calls back into Python; a KeyboardInterrupt raised there aborts the process
    (pybind11: "terminate called after throwing"). A stand-in `torch` package sends itself SIGINT while it
    imports: the signal must be held until the import ends, then raised as usual."""
    import subprocess
    import sys

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)  # the handler would have run by now\n"
        "print('held:', signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()))\n"
        "print('import ran to its end')\n")
    script = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
              "import signal\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not under a '&'\n"
              "from runtime import ctrl_c\n"
              "ctrl_c.install()\n"
              "try:\n"
              "    import torch\n"
              "except KeyboardInterrupt:\n"
              "    print('interrupted after the import:', ctrl_c.fired(), 'torch' in sys.modules)\n"
              "import signal\n"
              "print('held after:', signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=in_root)
    assert proc.stdout.splitlines() == ["held: True", "import ran to its end", "interrupted after the import: True "
                                        "False", "held after: False"], proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.15, 0.3, 0.6, 1.0])
def test_ctrl_c_at_any_moment_of_the_start_is_an_interrupt(delay, in_root):
    """SIGINT while the compiler, pydantic and torch still import: `interrupted` and 130, never a traceback.
    (Before about 60 ms the signal lands in Python's own start-up, before any nccompile code.)"""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "runtime", "specs/student.spec", "--recipe", "kd", "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even under a '&'
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # finished before the signal: nothing to check
        return
    assert proc.returncode == 130 and "nccompile: interrupted" in err and "Traceback" not in err, err
