"""Every study setting at the ends of what validation lets through, on a real (tiny) study.

As tests/test_settings_extremes.py does for recipes: each numeric, choice and flag field of the
study file (read from its configs, so a new field is covered without editing this file), at its
bounds, every choice and both flags, in a search over a tiny space. A case may be refused (exit
2) or run (exit 0), never end in an internal error or run past its alarm: a search that could not
end was found this way (every draw over budget).
"""
from __future__ import annotations

import pytest
import yaml

from runtime.cli import main
from runtime.study.config import StudyConfig

from .test_settings_extremes import _cases, alarm

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m "not slow"` skips them

SECONDS = 120  # per case: a hang, not a slow study
SPACE = ("model tiny(classes: int = 10, width: int = 8 in [4, 8, 48], depth: int = 1 in 1..2) {\n"
         "  input 3x8x8\n  budget params <= 5000\n"
         "  conv(width) bn relu {conv(width) bn relu} x depth gap flatten linear(classes)\n}\n")
RECIPE = "name: r\ndata: {limit_per_class: 5, batch_size: 16}\nsteps:\n  - {name: train, kind: train, epochs: 1}\n"
BASE = {"name": "s", "spec": "tiny.spec", "recipe": "r.yaml", "runs": [{"name": "fixed"}],
        "search": {"trials": 2, "objective": {"step": "train"}}}
CASES = _cases(StudyConfig, "", "study")


def _with(key: str, value) -> dict:
    study = yaml.safe_load(yaml.safe_dump(BASE))
    *path, last = key.split(".")
    node = study
    for part in path:
        node = node[part][0] if isinstance(node[part], list) else node[part]
    node[last] = value
    return study


def test_the_cases_reach_the_search_and_the_study():
    keys = {k for _, k, _ in CASES}
    assert {"share_steps", "search.trials", "search.sampler", "search.pruner", "search.seed",
            "search.objective.direction"} <= keys, keys


@pytest.mark.parametrize("kind, key, value", CASES, ids=[f"{k}-{v!r}" for _, k, v in CASES])
def test_a_study_setting_at_its_extreme_is_refused_or_runs(kind, key, value, tmp_path, capsys):
    (tmp_path / "tiny.spec").write_text(SPACE)
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_with(key, value)))
    with alarm(SECONDS, f"{key}={value!r}"):
        code = main(["study", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    printed = capsys.readouterr()
    assert code in (0, 2), (code, printed.err[-2000:])
    assert "internal error" not in printed.err + printed.out, (printed.err + printed.out)[-2000:]
    if code == 0:  # it ended with every trial accounted for, the fixed run and at least one drawn one
        results = (tmp_path / "out" / "results.csv").read_text()
        assert "fixed," in results and "search-" in results, results
