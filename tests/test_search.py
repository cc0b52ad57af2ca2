"""Search spaces in the spec (`base: int = 16 in 8..64 step 8`) and `nccompile search` (no torch)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import compiler
from compiler.errors import SpecError
from compiler.parse import parse_dsl
from compiler.space import configurations, size, spaces
from runtime.cli import main

SPACE = """
block dws(out: int, k: int) {
    dw: dwconv(k) bn relu6
    pw: pwconv(out)
}
model net(classes: int = 10, base: int = 16 in 8..40 step 8, blocks: int = 4 in [2, 3, 4, 5],
          kernel: int = 3 in [3, 5]) {
    input 3x32x32
    budget bytes(int8) <= 200_000
    budget params <= 190_000
    conv(base, kernel=3) bn relu6 maxpool(2)
    dws(2*base, kernel) maxpool(2)
    dws(4*base, kernel) maxpool(2)
    dws(8*base, kernel x blocks
    gap flatten
    fc: linear(classes)
}
""".replace("dws(8*base, kernel x blocks", "dws(8*base, kernel) x blocks")

YAML = """
model:
  name: net
  params:
    classes: {type: int, default: 10}
    base: {type: int, default: 16, in: 8..40 step 8}
    blocks: {type: int, default: 4, in: [2, 3, 4, 5]}
    kernel: {type: int, default: 3, in: [3, 5]}
  input: 3x32x32
  layers: [{conv: {out: base, kernel: kernel}}, bn, relu, gap, flatten, {linear: classes}]
"""


def _write(tmp_path, text, name="net.spec"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_spaces_read_the_same_in_the_dsl_and_yaml(tmp_path):
    dsl = compiler.compile_spec(_write(tmp_path, SPACE))
    yml = compiler.compile_spec(_write(tmp_path, YAML, "net.yaml"))
    for m in (dsl, yml):
        got = spaces(m.definition, m.params)
        assert [(s.name, [s[i] for i in range(len(s))]) for s in got] == [
            ("base", [8, 16, 24, 32, 40]), ("blocks", [2, 3, 4, 5]), ("kernel", [3, 5])]
        assert m.params["base"] == 16  # plain compilation uses the default
    assert size(spaces(dsl.definition, dsl.params)) == 40


@pytest.mark.parametrize("decl, fragment, at", [
    ("base: int = 12 in 8..40 step 8", "its default 12 is not in its space", "in 8"),
    ("base: int = 16 in 40..8", "the range 40..8 is empty", "in 40"),
    ("base: int = 16 in 8..40 step 0", "the step must be above 0", "0)"),
    ("base: int = 16 in []", "is empty", "in ["),
    ("base: int = 16 in [16, 16]", "lists a value twice", "in ["),
    ("w: float = 1.0 in 0.5..2.0", "a float range needs a step", "in 0"),
    ("b: bool = true in 0..1", "a bool parameter takes a list", "in 0"),
    ("base: int = 16 in [8, 16.5]", "expected an int", "16.5"),
])
def test_bad_spaces_are_spec_errors_with_their_position(decl, fragment, at):
    text = f"model net(classes: int = 10, {decl}) {{\n    input 3x8x8\n    gap flatten linear(classes)\n}}\n"
    with pytest.raises(SpecError) as err:
        compiler.compile_source(text, "bad.spec")
    message = str(err.value)
    assert fragment in message
    assert f"bad.spec:1:{text.index(at, 28) + 1}:" in message, message


def test_yaml_space_errors_have_their_position(tmp_path):
    bad = YAML.replace("in: 8..40 step 8", "in: 8..40 step 0")
    with pytest.raises(SpecError, match=r"net.yaml:6:\d+: error: the space of parameter `base`: the step"):
        compiler.compile_spec(_write(tmp_path, bad, "net.yaml"))


def test_in_channels_is_still_a_name():
    spec = parse_dsl("model m() { input 3x8x8\n conv(in_channels * 2) }", "x.spec")
    assert spec.models[0].params == []


def test_samples_are_seeded_distinct_and_within_the_space(tmp_path):
    m = compiler.compile_spec(_write(tmp_path, SPACE))
    sp = spaces(m.definition, m.params)
    a = list(configurations(sp, samples=10, seed=3))
    assert a == list(configurations(sp, samples=10, seed=3))
    assert a != list(configurations(sp, samples=10, seed=4))
    assert len({tuple(c.values()) for c in a}) == 10
    assert all(c["base"] in (8, 16, 24, 32, 40) and c["kernel"] in (3, 5) for c in a)
    assert len(list(configurations(sp, samples=1000))) == 40


def test_search_lists_only_configurations_that_meet_the_budgets_and_each_compiles_to_its_numbers(
        tmp_path, capsys):
    spec = _write(tmp_path, SPACE)
    assert main(["search", str(spec), "--json", "--all"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["evaluated"] == out["space_size"] == 40
    assert out["feasible"] + out["rejected_by_budget"] + out["invalid"] == 40
    assert out["rejected_by_budget"] > 0 and out["feasible"] == len(out["candidates"]) > 0
    for c in out["candidates"]:
        assert c["ok"] and c["bytes"]["int8"] <= 200_000 and c["params_count"] <= 190_000
        m = compiler.compile_spec(spec, param_strings={k: str(v) for k, v in c["params"].items()})
        a = compiler.analyse(m)
        assert (a.params, a.macs, compiler.predicted_bytes(m, "int8")) == (c["params_count"], c["macs"],
                                                                          c["bytes"]["int8"])
    # the front: no listed configuration has fewer bytes and at least as many parameters as another
    assert main(["search", str(spec), "--json"]) == 0
    front = json.loads(capsys.readouterr().out)["candidates"]
    assert 0 < len(front) <= len(out["candidates"])
    for a in front:
        assert not any(b is not a and b["bytes"]["int8"] <= a["bytes"]["int8"] and
                       b["params_count"] >= a["params_count"] and b != a for b in out["candidates"]
                       if (b["bytes"]["int8"], b["params_count"]) != (a["bytes"]["int8"], a["params_count"]))


def test_search_table_emit_and_fixed_parameters(tmp_path, capsys):
    spec = _write(tmp_path, SPACE)
    assert main(["search", str(spec), "--param", "kernel=5", "--objective", "macs", "--emit",
                 str(tmp_path / "chosen")]) == 0
    out = capsys.readouterr().out
    assert "20 of 20 configurations" in out and "Pareto front: most macs" in out
    files = sorted((tmp_path / "chosen").glob("*.spec"))
    assert files
    for f in files:
        m = compiler.compile_spec(f)
        assert m.params["kernel"] == 5 and compiler.analyse(m).ok


def test_a_fixed_parameter_may_take_a_value_outside_its_space(tmp_path, capsys):
    """--param fixes a parameter to any value of its type (it was an internal error outside the space)."""
    spec = _write(tmp_path, SPACE)
    assert main(["search", str(spec), "--param", "base=12", "--all", "--json"]) == 0, capsys.readouterr().err
    found = json.loads(capsys.readouterr().out)["candidates"]
    assert found and all("base" not in c["params"] for c in found)
    m = compiler.compile_spec(spec, param_strings={"base": "12", **{k: str(v) for k, v in found[0]["params"].items()}})
    assert m.root.params == found[0]["params_count"]


@pytest.mark.parametrize("args, fragment", [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--bytes", "int9"], "unknown format `int9`\n  expected: spec (the spec's precision) or fp32, fp16"),
    (["--param", "base=8", "--param", "blocks=2", "--param", "kernel=3"], "declares no search space"),
    (["--emit", "{spec}"], "is a file, not a folder"),  # were internal errors
    (["--emit", "/proc/no/such"], "cannot write the spec files there (No such file or directory)"),
])
def test_search_usage_errors(tmp_path, capsys, args, fragment):
    spec = _write(tmp_path, SPACE)
    assert main(["search", str(spec), *[a.format(spec=spec) for a in args]]) == 2
    assert fragment in capsys.readouterr().err


def test_more_samples_than_can_be_analysed_are_refused_at_once(tmp_path, capsys):
    """At about 1,200 configurations a second, 100 million draws ran for a day without a word."""
    spec = _write(tmp_path, SPACE.replace("in 8..40 step 8", "in 8..800000 step 8"))  # 800,000 configurations
    assert main(["search", str(spec), "--samples", "100000001"]) == 2
    assert "--samples 100,000,001: more than 100,000 configurations to analyse" in capsys.readouterr().err
    assert main(["search", str(spec), "--samples", "3", "--all"]) in (0, 1)  # a few draws run (1: none fits)
    assert "3 of 800,000 configurations analysed" in capsys.readouterr().out


def test_search_does_not_import_torch(tmp_path):
    spec = _write(tmp_path, SPACE)
    code = ("import sys; from runtime.cli import main; rc = main(['search', %r]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)" % str(spec))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
