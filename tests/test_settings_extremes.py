"""Every recipe setting at the ends of what validation lets through, on a real (tiny) run.

The fuzzer (tests/test_fuzz.py) mutates recipes but only plans them (`--dry-run`); the settings
here reach the steps' own code. For each numeric field of the recipe and of every step kind: its
bounds (a strict bound nudged inside), and for a field with no upper bound a huge value; for each
choice field every choice; for each flag both values. A case may be refused (exit 2), fail a budget
(exit 1) or run (exit 0), but never end in an internal error or run past its alarm. Fields that
only say how much work to do (epochs, iterations) are not made huge: that is a long run, not a bug.
The field list is read from the configs, so a new setting is covered without editing this file.
"""
from __future__ import annotations

import contextlib
import signal
import typing

import pytest
from pydantic import BaseModel

from runtime.cli import main
from runtime.recipe import Recipe, yaml_float
from runtime.steps.base import REGISTRY

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m "not slow"` skips them

WORK = {"epochs", "iterations", "freeze_bn_epochs", "warmup_epochs"}  # huge = a long run, not a bug
SKIP = {"seed",  # covered in test_hostile
        "speed.compile",  # torch.compile takes minutes on the CPU; covered in test_devices
        "data.source", "data.download"}  # other data sources: covered in test_runtime, never downloaded
CONTEXT = {  # what a field needs around it to take effect at all
    "schedule.step_size": ["schedule.name=step"], "schedule.gamma": ["schedule.name=step"],
    "optimizer.momentum": ["optimizer.name=sgd"], "optimizer.nesterov": ["optimizer.name=sgd"],
    "steps.prune.cost_power": ["steps.prune.scope=global", "steps.prune.cost=activations"],
    "steps.prune.min_rate": ["steps.prune.scope=global"],
    "steps.distill.teacher_cache": ["transforms.train=[{flip: 0.5}]"],
    "steps.prune.cost": ["steps.prune.scope=global"],
    **{f"steps.{k}.quantize_aware.{f}": [f"steps.{k}.quantize_aware.format=int4"]
       for k in ("train", "distill") for f in ("scales", "freeze_bn_epochs")},
}
HUGE_FLOAT, HUGE_INT = 1e300, 10**12
SECONDS = 60  # per case: a hang, not a slow run

TINY = ("model tiny(classes: int = 10) {\n  input 3x16x16\n"
        "  conv(8) bn relu maxpool(2) conv(16) bn relu gap flatten linear(classes)\n}\n")
HEAD = ("name: r\nseed: 0\ndata: {limit_per_class: 5, batch_size: 16}\nmodels:\n  teacher: {spec: tiny.spec}\n"
        "steps:\n  - {name: train, kind: train, model: student, epochs: 1}\n"
        "  - {name: teacher, kind: train, model: teacher, epochs: 1}\n")
STEP = {  # one step of each kind after a trained student and teacher
    "train": "",
    "distill": "  - {name: distill, kind: distill, model: student, teacher: teacher, epochs: 1}\n",
    "quantize": "  - {name: quantize, kind: quantize, model: student, format: int8, integer_inference: true}\n",
    "prune": "  - {name: prune, kind: prune, model: student, rate: 0.5, finetune: {epochs: 1}}\n",
    "lowrank": "  - {name: lowrank, kind: lowrank, model: student, finetune: {epochs: 1}}\n",
    "evaluate": "  - {name: evaluate, kind: evaluate, model: student}\n",
    "export": "  - {name: export, kind: export, model: student}\n",
}
RUNS = set(STEP)  # not `predict`: it needs a food-11 testing/ folder (covered in test_runtime)


def _bounds(field) -> dict:
    return {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in field.metadata
            if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}


def _numbers(name: str, kind: type, field) -> list:
    b = _bounds(field)
    nudge = (lambda v, d: v + d) if kind is int else (lambda v, d: v + d * max(abs(v), 1) * 1e-9)
    low = b.get("ge", nudge(b["gt"], 1) if "gt" in b else None)
    if "gt" in b and kind is float and b["gt"] == 0:
        low = 1e-300  # the smallest a user can mean by "more than 0"
    high = b.get("le", nudge(b["lt"], -1) if "lt" in b else None)
    if high is None and name not in WORK:
        high = HUGE_FLOAT if kind is float else HUGE_INT
    if low is None:
        low = -HUGE_FLOAT if kind is float else -HUGE_INT
    return [v for v in dict.fromkeys([low, high]) if v is not None]


def _values(name: str, field) -> list:
    """The values of one field worth a run: its ends, every choice, both flags."""
    out = []
    ann = field.annotation
    for a in (ann,) if typing.get_origin(ann) is typing.Literal else typing.get_args(ann) or (ann,):
        if a in (int, float):
            out += _numbers(name, a, field)
        elif a is bool:
            out += [True, False]
        elif typing.get_origin(a) is typing.Literal:
            out += list(typing.get_args(a))
    return [v for v in dict.fromkeys(out) if v != field.default]


def _cases(cls, prefix: str, kind: str, seen=()) -> list:
    cases = []
    for name, field in cls.model_fields.items():
        if f"{prefix}{name}" in SKIP:
            continue
        nested = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested and nested[0] not in seen:
            cases += _cases(nested[0], f"{prefix}{name}.", kind, (*seen, nested[0]))
        cases += [(kind, f"{prefix}{name}", v) for v in _values(name, field)]
    return cases


CASES = _cases(Recipe, "", "train") + [
    c for kind, step in REGISTRY.items() if kind in RUNS for c in _cases(step.config, f"steps.{kind}.", kind)]


def _yaml(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return yaml_float(v) if isinstance(v, float) else str(v)


def test_the_cases_cover_every_step_kind_that_runs_here():
    assert {kind for kind, _, _ in CASES} == RUNS and set(REGISTRY) - RUNS == {"predict"}
    assert len(CASES) > 100


class _Alarm(BaseException):  # not an Exception: the CLI must not report it as its own error
    pass


def _alarm(signum, frame):
    raise _Alarm()


@contextlib.contextmanager
def alarm(seconds: int, what: str):
    """Fail the test when the block still runs after `seconds` (a hang, not a slow case)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    except _Alarm:
        pytest.fail(f"{what}: still running after {seconds} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("extremes")
    (root / "tiny.spec").write_text(TINY)
    return root


@pytest.mark.parametrize("kind, key, value", CASES, ids=[f"{k}-{v!r}" for _, k, v in CASES])
def test_a_setting_at_its_extreme_is_refused_or_runs(kind, key, value, folder, capsys, tmp_path):
    recipe = folder / f"{tmp_path.name}.yaml"  # next to tiny.spec, which the recipe names
    recipe.write_text(HEAD + STEP[kind])
    out = tmp_path / "run"
    sets = [a for c in CONTEXT.get(key, []) for a in ("--set", c)] + ["--set", f"{key}={_yaml(value)}"]
    with alarm(SECONDS, f"{key}={value!r}"):
        code = main([str(folder / "tiny.spec"), "--recipe", str(recipe), "--device", "cpu", "--out", str(out), *sets])
    printed = capsys.readouterr()
    assert code in (0, 1, 2), (code, printed.err[-2000:])
    assert "internal error" not in printed.err, printed.err[-2000:]
    OUTCOMES[code] = OUTCOMES.get(code, 0) + 1


OUTCOMES: dict[int, int] = {}


def test_most_extremes_run_rather_than_being_refused():
    """The cases mean something only if they reach the steps: most must run to the end."""
    if sum(OUTCOMES.values()) < len(CASES):
        pytest.skip("run with the whole module")
    assert OUTCOMES.get(0, 0) > 0.8 * len(CASES), OUTCOMES
