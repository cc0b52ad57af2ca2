"""Profiling in the machine's fast spells: a probe around each measurement, slow ones taken again."""
from __future__ import annotations

import pytest

import compiler
from compiler import latency
from runtime.profile import _fresh_table, measure, profile
from runtime.profile.rounds import Rounds
from runtime.profile.steady import GATE, Steadiness

SPEC = """model tiny {
    input 3x8x8
    conv(8) bn relu
    maxpool(2)
    gap flatten
    head: linear(4)
}
"""


def _state(fastest: float = 1.0) -> Steadiness:
    state = Steadiness("torch-fp32", 1, 1, call=lambda: None)
    state.fastest = fastest
    return state


def test_a_measurement_from_a_fast_spell_is_kept_over_a_faster_one_from_a_slow_spell():
    state = _state()
    slow, fast = 1.5 * GATE, 1.0
    assert state.slow(slow) and not state.slow(GATE)
    assert state.better((2.0, fast), (1.0, slow))  # slower, but timed while the machine ran at its fastest
    assert not state.better((1.0, slow), (2.0, fast))
    assert state.better((1.0, fast), (2.0, fast)) and not state.better((3.0, slow), (2.0, slow))
    assert state.better((9.0, slow), None)


def test_the_probe_is_the_targets_empty_model_and_remembers_its_fastest():
    state = Steadiness("ort-int8", 1, 1)  # ORT's float session: an int8 file of no layer is nothing to time
    first = state.now()
    assert first > 0 and state.fastest == first
    (value, probe) = state.around(lambda x: 2 * x, 21)
    assert value == 42 and probe >= state.fastest and state.fastest <= first
    unprobed = Steadiness("torch-fp32", 1, 1)  # PyTorch's empty call did not tell the spells apart
    assert unprobed.now() == 0.0 and not unprobed.slow(unprobed.around(lambda: None)[1])
    assert unprobed.better((1.0, 0.0), (2.0, 0.0)) and not unprobed.better((3.0, 0.0), (2.0, 0.0))


def test_whole_models_keep_their_fastest_round_and_profiles_prefer_a_fast_spell():
    rounds = Rounds(None, 3, _state(), 2)
    rounds.times = {"a": [1.0, 2.0, 1.8], "b": [5.0, 4.0]}
    assert rounds.best == {"a": 1.0, "b": 4.0}  # the fastest round, whatever the probe said
    rounds.profiled = {"fast": [2, 1.0, 0.1], "slow": [2, 1.5 * GATE, 0.1], "new": [1, 9.0, 0.1]}
    assert not rounds._wants_profile("fast") and rounds._wants_profile("slow") and rounds._wants_profile("new")
    rounds.profiled["slow"] = [4, 1.5 * GATE, 0.1]  # two more at most
    assert not rounds._wants_profile("slow")


def _scripted_probe(monkeypatch, script: list[float]) -> None:
    """Steadiness.now returns the script's values in turn, then 1.0 (the fastest)."""
    values = iter(script)

    def now(self):
        ms = next(values, 1.0)
        self.fastest = min(self.fastest, ms)
        return ms

    monkeypatch.setattr(Steadiness, "now", now)


def test_whole_models_no_round_of_which_met_a_fast_spell_are_timed_again_and_only_they(tmp_path, monkeypatch):
    """Three rounds over two models and their empty model: the probe after `b` reads slow each time, so
    `b` and the empty model (timed after it) met no fast spell and get a fourth round; `a` does not."""
    a = compiler.compile_source(SPEC, "a.spec")
    b = compiler.compile_source(SPEC.replace("tiny", "b"), "b.spec")
    slow = 2 * GATE
    # each round: the probe before a, after a, after b, after the empty model; round 4: before b, after b, after it
    _scripted_probe(monkeypatch, [1.0, 1.0, slow, slow] * 3)
    table = _fresh_table(tmp_path / "torch-fp32.json", "torch-fp32", 1, 1)
    rounds = Rounds(table, 3, Steadiness("torch-fp32", 1, 1), profiles=0)
    rounds.settle([a, b], 3, 9)
    assert rounds.done == 4
    assert len(rounds.times["tiny@3x8x8"]) == 3 and len(rounds.times["b@3x8x8"]) == 4
    assert len(rounds.times[(3, 8, 8)]) == 4
    assert all(ms > 0 for ms in rounds.best.values())


def test_whole_model_rounds_stop_at_the_most_when_the_machine_stays_slow(tmp_path, monkeypatch):
    model = compiler.compile_source(SPEC, "tiny.spec")
    _scripted_probe(monkeypatch, [1.0] + [2 * GATE] * 100)  # one fast probe, then a slow machine
    table = _fresh_table(tmp_path / "torch-fp32.json", "torch-fp32", 1, 1)
    rounds = Rounds(table, 3, Steadiness("torch-fp32", 1, 1), profiles=0)
    rounds.settle([model], 3, 5)
    assert rounds.done == 5 and len(rounds.times["tiny@3x8x8"]) == 5
    assert rounds.best["tiny@3x8x8"] == min(rounds.times["tiny@3x8x8"])  # still the fastest round


def test_profile_times_again_a_unit_a_slow_spell_caught_and_keeps_its_fast_spell_value(tmp_path, monkeypatch):
    """The maxpool's two passes meet a slow spell (the probe after them at 2x its fastest): a third pass
    times it again, and that time is kept though it reads slower. (A torch table, with a probe put in
    its place: PyTorch profiles without one, and its whole models are quicker to time than ORT's.)"""
    measured: dict[str, int] = {}
    spell = {"slow": False}

    def unit_ms(model, empty, target, *args, **kwargs):
        op = model.root.children[0].op
        measured[op] = measured.get(op, 0) + 1
        spell["slow"] = op == "maxpool" and measured[op] <= 2
        return {"ms": {1: 0.5, 2: 0.6, 3: 0.9}[measured[op]] if op == "maxpool" else 0.1, "run_ms": 1.0}

    def now(self):
        ms = 2.0 if spell.pop("slow", False) else 1.0
        self.fastest = min(self.fastest, ms)
        return ms

    monkeypatch.setattr(measure, "unit_ms", unit_ms)
    monkeypatch.setattr(Steadiness, "now", now)
    table = _fresh_table(tmp_path / "torch-fp32.json", "torch-fp32", 1, 1)
    model = compiler.compile_source(SPEC, "tiny.spec")
    profile([model], table, 3)
    assert measured["maxpool"] == 3 and measured["conv"] == 2
    pool = next(u for u in latency.units_on(model, "torch-fp32") if u.text.startswith("maxpool"))
    assert table.entries[pool.key]["ms"] == pytest.approx(0.9)
    assert len(table.fit["models"]["tiny@3x8x8"]["rounds_ms"]) == 3  # not slow: no extra round


def test_a_models_in_model_times_come_from_one_whole_profile(tmp_path, monkeypatch):
    """Of a model's profiles the one of least sum is kept whole, one from a fast spell over any from a slow
    one: each unit's lowest over profiles would sum lower than any profile measured (a tiny node's net
    time is mostly noise)."""
    model = compiler.compile_source(SPEC, "tiny.spec")
    table = _fresh_table(tmp_path / "ort-fp32.json", "ort-fp32", 1, 1)
    for unit in latency.units_on(model, "ort-fp32"):
        table.entries[unit.key] = {"ms": 0.01}
    conv, pool = (next(u for u in latency.units_on(model, "ort-fp32") if u.text.startswith(op)) for op in
                  ("conv", "maxpool"))
    profiles = iter([({conv.paths[0]: 0.010, pool.paths[0]: 0.002}, 1.0),   # sum 0.012
                     ({conv.paths[0]: 0.007, pool.paths[0]: 0.004}, 1.0),   # sum 0.011: kept whole
                     ({conv.paths[0]: 0.001, pool.paths[0]: 0.001}, 9.0)])  # a slow spell's: not kept
    state = _state()
    monkeypatch.setattr(Steadiness, "around", lambda self, *a, **k: next(profiles))
    rounds = Rounds(table, 3, state, 3)
    rounds._profile([model] * 3)
    ctx = {u.text.split("(")[0]: table.entries[u.key]["ctx"]["tiny@3x8x8"] for u in (conv, pool)}
    assert ctx == pytest.approx({"conv": 0.007, "maxpool": 0.004})
    assert rounds.profiled["tiny@3x8x8"] == [3, 1.0, pytest.approx(0.011)]
