"""Fuzzing: mutations of valid specs, recipes and model files, fed to the command line.

Every case must end with exit code 0, 1 or 2 (never 70, an internal error), within a few
seconds, under a memory cap (the address space may grow by NCCOMPILE_FUZZ_MEMORY_MB, default 2048,
over what the test process holds when fuzzing starts: an allocation past it fails the case), writing
nothing outside its temporary folder. The number of cases per kind is
NCCOMPILE_FUZZ_EXAMPLES (default 60 in the test suite); the search is derandomized, so CI
sees the same cases every run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.cli import main

from .conftest import ROOT, SPECS

MEMORY_MB = int(os.environ.get("NCCOMPILE_FUZZ_MEMORY_MB", "2048"))
EXAMPLES = int(os.environ.get("NCCOMPILE_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
FUZZ_SEEDS = Path(__file__).parent / "fuzz_seeds"
SEEDS = [SPECS / "student.spec", SPECS / "resnet18.spec", SPECS / "origin.spec", SPECS / "student.yaml",
         SPECS / "student_4bit.spec", SPECS / "student_space.spec", FUZZ_SEEDS / "ranges.spec",
         FUZZ_SEEDS / "torchvision.yaml"]
# Each class of hostile input found by hand has tokens here that make it: an operator chain, a float range
# whose step count overflows, a second `input` line, a layer named twice in `precision`, a mapping where
# a name belongs.
TOKENS = ["{", "}", "(", ")", "[", "]", ",", ":", "x", "*", "/", "-", "0", "1", "-1", "1e309", "999999999999",
          "9" * 5000, "true", "conv", "linear", "bn", "relu", "residual", "project", "gap", "flatten", "input",
          "budget", "model", "block", "int", "float", "in", "x 1000000", "\n", "#", "'", '"', "&a", "*a", "nan", "\x00",
          "+1" * 150, "1e308", "1e-308", " step 1e-308", "\n  input 3x16x16\n", ', "features.10.3.pw": int2',
          "{name: resnet18, bogus: 1}"]


@pytest.fixture(autouse=True, scope="module")
def memory_cap(model_file, tmp_path_factory):
    """Lower the soft address-space limit for this module's cases (Linux), and restore it after.
    One valid case of each kind runs first, so that libraries loaded lazily are mapped before the cap."""
    resource = pytest.importorskip("resource")
    if not Path("/proc/self/statm").exists():
        yield None
        return
    warm = tmp_path_factory.mktemp("warm")
    (warm / "m.safetensors").write_bytes(model_file)
    for args in ([str(SPECS / "student.spec"), "--json"], [str(SPECS / "student.yaml"), "--json"],
                 [str(SPECS / "student.spec"), "--recipe", str(RECIPES[0]), "--dry-run"],
                 ["load", str(warm / "m.safetensors")]):
        assert main(args) in (0, 1), args
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    held = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = held + MEMORY_MB * 2**20
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_memory_cap_holds(memory_cap):
    """The cap is real: allocating past it fails (so a case that tried would fail its check)."""
    if memory_cap is None:
        pytest.skip("no /proc here: no address-space cap")
    with pytest.raises(MemoryError):
        bytearray(MEMORY_MB * 2**20 + 2**30)


def _mutate(text: str, edits: list[tuple[int, int, str]]) -> str:
    for pos, cut, token in edits:
        at = pos % (len(text) + 1)
        text = text[:at] + token + text[at + cut:]
    return text


EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 8), st.sampled_from(TOKENS)),
                 min_size=1, max_size=6)


def _check(args: list[str], tmp: Path, capsys) -> None:
    before = set(Path.cwd().iterdir())
    start = time.perf_counter()
    code = main(args)
    printed = capsys.readouterr()
    assert code in (0, 1, 2), (args, printed.out[-2000:], printed.err[-2000:])
    assert "internal error" not in printed.err, printed.err
    assert time.perf_counter() - start < 10, f"{args}: took {time.perf_counter() - start:.1f} s"
    assert set(Path.cwd().iterdir()) == before, "a file was written outside the temporary folder"


@SETTINGS
@given(seed=st.sampled_from(SEEDS), edits=EDITS)
def test_mutated_specs(seed, edits, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("spec")
    spec = tmp / f"mutant{seed.suffix}"
    spec.write_text(_mutate(seed.read_text(), edits))
    _check([str(spec), "--json"], tmp, capsys)


RECIPES = sorted((SPECS / "recipes").glob("*.yaml"))


@pytest.mark.slow
@SETTINGS
@given(seed=st.sampled_from(RECIPES), edits=EDITS)
def test_mutated_recipes_in_a_dry_run(seed, edits, tmp_path_factory, capsys, monkeypatch):
    tmp = tmp_path_factory.mktemp("recipe")
    recipe = tmp / "mutant.yaml"
    text = _mutate(seed.read_text(), edits).replace("../teacher.spec", str(SPECS / "teacher.spec"))
    recipe.write_text(text)
    monkeypatch.chdir(tmp)
    _check([str(SPECS / "student.spec"), "--recipe", str(recipe), "--dry-run"], tmp, capsys)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> bytes:
    import compiler
    from runtime.weights import save_model

    spec = tmp_path_factory.mktemp("model") / "small.spec"
    spec.write_text("model small(classes: int = 3) { input 3x8x8 conv(4) bn relu gap flatten linear(classes) }\n")
    model = compiler.compile_spec(spec)
    path = spec.with_suffix(".safetensors")
    save_model(compiler.build_module(model), model, path, "int4")
    return path.read_bytes()


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 100_000)))
def test_mutated_model_files_in_load(model_file, flips, cut, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("load")
    data = bytearray(model_file)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp / "mutant.safetensors"
    path.write_bytes(bytes(data))
    _check(["load", str(path)], tmp, capsys)


def test_the_fuzz_seeds_are_valid(capsys):
    for seed in SEEDS:
        assert main([str(seed), "--json"]) in (0, 1)
    capsys.readouterr()
    assert ROOT.is_dir()
