"""Language features and their error messages, on small inline specs."""
from __future__ import annotations

import subprocess
import sys

import pytest

import compiler
from compiler.errors import SpecError, UsageError
from compiler.expr import divisible
from compiler.parse.dsl import parse_number

from .conftest import ROOT


def compile_text(tmp_path, text, name="m.spec", **kw):
    path = tmp_path / name
    path.write_text(text)
    return compiler.compile_spec(path, **kw)


def errors(tmp_path, text, name="m.spec", **kw) -> str:
    with pytest.raises(SpecError) as info:
        compile_text(tmp_path, text, name, **kw)
    return str(info.value)


@pytest.mark.parametrize("text,value", [("300k", 300_000), ("1.5M", 1_500_000), ("2G", 2 * 10**9),
                                        ("300_000", 300_000), ("0.5", 0.5), ("1e-5", 1e-5), ("16", 16)])
def test_number_suffixes(text, value):
    assert parse_number(text) == value


def test_expressions_and_divisible(tmp_path):
    m = compile_text(tmp_path, """
model m(width: int = 20, mult: float = 0.7) {
    input 3x8x8
    conv(2*width) conv(int(width*mult)) conv(divisible(width*mult, 8)) conv(max(1, width // 3 - 10))
}""")
    outs = [n.attrs["out"] for n in m.root.leaves()]
    assert outs == [40, 14, divisible(14.0, 8), 1]
    assert divisible(14.0, 8) == 16 and divisible(3, 8) == 8 and divisible(36, 8) == 40


def test_width_multiplier_scales_layers_except_opted_out(tmp_path):
    text = """
model m(classes: int = 10, mult: float = 1.0) {
    input 3x16x16
    width_mult mult round_to 8
    conv(32) bn relu dwconv(3) pwconv(64) gap flatten linear(100) fc: linear(classes, scale=false)
}"""
    base = compile_text(tmp_path, text)
    half = compile_text(tmp_path, text, params={"mult": 0.5})
    outs = lambda m: [n.attrs.get("out", n.attrs.get("channels")) for n in m.root.leaves()  # noqa: E731
                      if n.op in ("conv", "bn", "linear")]
    assert outs(base) == [32, 32, 32, 64, 104, 10]  # every scaled width is a multiple of 8: 100 -> 104
    assert outs(half) == [16, 16, 16, 32, 48, 10]  # 100*0.5=50 -> 48 (multiple of 8)
    assert compiler.analyse(half).params < compiler.analyse(base).params


def test_repetition_and_labels_give_torchvision_like_names(tmp_path):
    m = compile_text(tmp_path, """
block b(out: int) { c: conv(out) n: bn relu }
model m { input 3x8x8  layer1: b(4) x 2  gap flatten fc: linear(2) }""")
    names = [n for n, _ in m.root.state_tensors()]
    assert names[:2] == ["layer1.0.c.weight", "layer1.0.c.bias"]
    assert "layer1.1.n.running_var" in names and names[-1] == "fc.bias"


def test_explicit_shortcut_and_projection(tmp_path):
    m = compile_text(tmp_path, """
model m {
    input 3x8x8
    conv(8)
    residual { conv(16, stride=2) } shortcut { avgpool(2) pwconv(16) }
    residual project { conv(32, stride=2) }
}""")
    res1, res2 = [n for n in m.root.walk() if n.op == "residual"]
    assert [c.name for c in res1.children] == ["body", "shortcut"]
    proj = res2.children[1]
    assert proj.layer == "projection" and proj.children[0].attrs["stride"] == 2
    assert m.root.out_shape == (32, 2, 2)


def test_all_errors_in_a_file_are_reported_at_once(tmp_path):
    text = errors(tmp_path, """
block a(out: int) { conv(out) }
block a(out: int) { conv(out) }
model m(n: int = 4) {
    input 3x8x8
    budget bytes(int9) <= 1k
    budget bytes <= 1k
    lin: conv(nn) lin: bn
    frobnicate(2)
}""")
    assert text.count("error:") == 6, text
    for fragment in ["defined twice", "unknown weight format `int9`",
                     "a `bytes` budget needs the model file's weight format", "unknown name `nn`",
                     "label `lin` is used twice", "unknown layer or block `frobnicate`"]:
        assert fragment in text
    assert text.endswith("6 errors")


def test_recursive_block_is_an_error(tmp_path):
    assert "calls itself" in errors(tmp_path, "block a { a } model m { input 3x4x4 a }")


def test_repetition_count_must_be_positive_int(tmp_path):
    assert "repetition count must be a positive int" in errors(tmp_path, "model m { input 3x4x4 conv(4) x 0 }")


def test_x_is_repetition_only_after_a_layer(tmp_path):
    # The contextual lexer reads `x` as a keyword only where repetition can follow.
    m = compile_text(tmp_path, "model m(x: int = 2) { input 3x4x4 conv(x) x x }")
    assert [n.attrs["out"] for n in m.root.leaves()] == [2, 2]


def test_groups_must_divide(tmp_path):
    text = errors(tmp_path, "model m { input 3x4x4 conv(8, groups=2) }")
    assert "groups=2 must divide the input channels (3)" in text and "m.spec:1:" in text


def test_unknown_torchvision_model(tmp_path):
    text = errors(tmp_path, "model m { input 3x32x32 torchvision resnet81(num_classes=3) }")
    assert "torchvision has no classification model `resnet81`" in text and "did you mean `resnet18`?" in text


def test_several_models_need_model_option(tmp_path):
    text = "model a { input 3x4x4 conv(2) } model b { input 3x4x4 conv(3) }"
    with pytest.raises(UsageError, match="choose one with --model"):
        compile_text(tmp_path, text)
    assert compile_text(tmp_path, text, model="b").root.out_shape == (3, 4, 4)
    with pytest.raises(UsageError, match="did you mean `b`"):
        compile_text(tmp_path, text, model="bb")


def test_yaml_residual_group_and_torchvision_forms(tmp_path):
    m = compile_text(tmp_path, """
model:
  input: [3, 16, 16]
  layers:
    - conv: 8
    - residual: [{conv: 16}, bn]
      project: true
      name: res
    - {group: [relu, gap, flatten], name: head}
    - {linear: 4}
""", name="m.yaml")
    assert [c.name for c in m.root.children] == ["0", "res", "head", "3"]
    assert m.root.out_shape == (4,)


def test_cli_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "runtime", "specs/student.spec", "--json"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    over = subprocess.run([sys.executable, "-m", "runtime", "specs/student.spec", "--param", "base=32"], cwd=ROOT,
                          capture_output=True, text=True)
    assert over.returncode == 1 and "FAIL  bytes(int8) <= 300,000" in over.stdout
    bad = subprocess.run([sys.executable, "-m", "runtime", "specs/student.spec", "--frobnicate"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_json_output_schema(in_root, capsys):
    import json

    from runtime.cli import main

    assert main(["specs/student.spec", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 256_779 and isinstance(data["macs"], int)
    assert data["input"] == [3, 256, 256]
    assert set(data["bytes"]) == {"fp32", "fp16", "int8", "int8-channel", "int4", "int2"}
    assert all(isinstance(v, int) for v in data["bytes"].values())
    budget = data["budgets"][0]
    assert {"name", "limit", "value", "ok"} <= set(budget) and budget["ok"] is True
    assert budget["value"] == data["bytes"]["int8"] and budget["limit"] == 300_000
    assert sum(r["params"] for r in data["layers"] if r["depth"] == 1) == data["params"]


def test_analysis_never_imports_torch():
    """`nccompile specs/resnet18.spec --json` runs without importing torch (checked in a fresh process)."""
    code = ("import sys; from runtime.cli import main; rc = main(['specs/resnet18.spec', '--json']); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision')));"
            "print('IMPORTED', bad, file=sys.stderr) if bad else None; sys.exit(rc or (3 if bad else 0))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # and the real console entry point, traced with -X importtime
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "runtime", "specs/resnet18.spec", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "lark" in imported


def test_a_budget_written_as_a_whole_float_reads_as_an_integer(tmp_path, capsys):
    from runtime.cli import main

    spec = tmp_path / "m.spec"
    spec.write_text("model m {\n  input 3x8x8\n  budget params <= 1e6\n  conv(8) gap flatten linear(10)\n}\n")
    assert main([str(spec)]) == 0
    assert "ok    params <= 1,000,000: 314 (" in capsys.readouterr().out
