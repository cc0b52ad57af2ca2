"""`nccompile study`: runs, grids and searches on Optuna storage; resume; two workers; bad input."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import optuna
import pytest

import compiler
from compiler.errors import NcError
from runtime.cli import main

from .conftest import DATA, ROOT
from .test_runtime import SMALL_TEACHER, needs_data

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m "not slow"` skips them

TINY = """
model tiny(classes: int = 10, width: int = 8 in [4, 8, 16, 48], depth: int = 1 in 1..2) {
    input 3x8x8
    budget params <= 5000
    conv(width) bn relu
    {conv(width) bn relu} x depth
    gap flatten
    head: linear(classes)
}
"""
RECIPE = "name: r\ndata: {limit_per_class: 8}\nsteps:\n  - {name: train, kind: train, epochs: 1}\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tiny.spec").write_text(TINY)
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path


def _study(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _results(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_runs_and_grid_write_results_summary_and_plot_and_a_rerun_trains_nothing(files, capsys):
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\n"
                          "runs:\n  - {name: narrow, params: {width: 4}}\n"
                          "grid:\n  params: {width: [8, 16]}\n  set: {steps.train.label_smoothing: [0.0, 0.1]}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = _results(out)
    assert [r["name"] for r in rows] == ["narrow", "grid-width8-label_smoothing0p0", "grid-width8-label_smoothing0p1",
                                         "grid-width16-label_smoothing0p0", "grid-width16-label_smoothing0p1"]
    assert all(r["status"] == "done" for r in rows)
    for r in rows:
        m = compiler.compile_spec(files / "tiny.spec", param_strings={k: str(v) for k, v in
                                                                     json.loads(r["model_params"]).items()})
        assert int(r["params_count"]) == compiler.analyse(m).params
        assert int(r["file_bytes"]) == compiler.predicted_bytes(m, "fp32")
        assert 0 <= float(r["val_accuracy"]) <= 1
    assert (out / "summary.md").read_text().count("| done |") == 5
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    reports = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")}
    assert len(reports) == 5
    capsys.readouterr()
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")} == reports  # nothing ran
    assert [r["name"] for r in _results(out)] == [r["name"] for r in rows]


def test_a_study_directory_refuses_other_settings_instead_of_mixing_results(files, capsys):
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: one}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--device", "cpu", "--epochs", "1"]) == 0
    reports = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")}
    capsys.readouterr()
    assert main(["study", str(study), "--out", str(out), "--device", "cpu", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 1" in err and "--epochs 2" in err and "another --out" in err and "Traceback" not in err
    assert main(["study", str(study), "--out", str(out), "--device", "cpu", "--epochs", "1",
                 "--set", "optimizer.lr=0.01"]) == 2
    assert "--set optimizer.lr=0.01" in capsys.readouterr().err
    # the same settings resume (nothing left to do); another directory takes the new settings
    assert main(["study", str(study), "--out", str(out), "--device", "cpu", "--epochs", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")} == reports
    assert main(["study", str(study), "--out", str(files / "other"), "--device", "cpu", "--epochs", "2"]) == 0


def test_a_failing_trial_is_recorded_and_the_study_goes_on(files, capsys):
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n"
                          "  - {name: explodes, set: {optimizer.lr: 1e30}}\n  - {name: fine}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0
    rows = {r["name"]: r for r in _results(out)}
    assert rows["explodes"]["status"] == "failed" and "became" in rows["explodes"]["error"]
    assert rows["fine"]["status"] == "done"


def test_search_rejects_configurations_over_budget_without_training(files, capsys):
    study = _study(files, "name: s\nsearch:\n  spec: tiny.spec\n  recipe: r.yaml\n  trials: 3\n  sampler: grid\n"
                          "  objective: {step: train}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = _results(out)
    done = [r for r in rows if r["status"] in ("done", "repeat")]
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(done) == 3
    for r in rejected:
        params = json.loads(r["model_params"])
        m = compiler.compile_spec(files / "tiny.spec", param_strings={k: str(v) for k, v in params.items()})
        assert not compiler.analyse(m).ok and "params <= 5,000 fails" in r["error"]
        assert not (out / "trials" / r["name"]).exists()
    for r in done:
        assert int(r["params_count"]) <= 5000 and float(r["objective"]) == float(r["val_accuracy"])


def test_dry_run_shows_every_run_and_the_search_space_and_writes_nothing(files, capsys):
    """`--dry-run`: the runs with their verdict on the budgets, the search's space and how many of its
    configurations meet the budgets (counted here from each configuration's own analysis)."""
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\n"
                          "runs:\n  - {name: narrow, params: {width: 4}}\n  - {name: wide, params: {width: 48}}\n"
                          "search:\n  spec: tiny.spec\n  recipe: r.yaml\n  trials: 3\n  objective: {step: train}\n")
    before = sorted(p.name for p in files.iterdir())
    assert main(["study", str(study), "--out", str(files / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    narrow = next(i for i, line in enumerate(lines) if line.strip().startswith("narrow "))
    wide = next(i for i, line in enumerate(lines) if line.strip().startswith("wide "))
    assert "rejected" not in lines[narrow + 1] and "width=4" in lines[narrow], out
    assert "rejected before training: params <= 5,000 fails: " in lines[wide + 1], out  # which budget, not a banner
    assert "  width: [4, 8, 16, 48]" in lines and "  depth: [1, 2]" in lines, out
    meet = sum(compiler.analyse(compiler.compile_spec(files / "tiny.spec", param_strings={
        "width": str(w), "depth": str(d)})).ok for w in (4, 8, 16, 48) for d in (1, 2))
    assert 0 < meet < 8 and f"  8 configuration(s); {meet} meet every budget, {8 - meet} break one" in out, out
    assert "search: 3 trial(s)" in out and "nothing was trained or written" in out, out
    assert sorted(p.name for p in files.iterdir()) == before  # no study folder, no journal


def test_a_search_may_fix_a_parameter_outside_its_space(files, capsys):
    study = _study(files, "name: s\nsearch: {spec: tiny.spec, recipe: r.yaml, params: {width: 6}, "
                          "objective: {step: train}}\n")
    assert main(["study", str(study), "--out", str(files / "out"), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "  depth: [1, 2]" in out and "width" not in out.split("search:")[1].split("outputs:")[0], out


def test_one_problem_of_many_runs_is_one_line(files, capsys):
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\ngrid: {set: {seed: [0, 1, 2, 3, 4, 5]}}\n")
    assert main(["study", str(study), "--set", "optimizer.lr=-1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grid point grid-seed0, grid point grid-seed1 and 4 more runs: " in err[0], err
    assert "`optimizer.lr`: Input should be greater than 0" in err[0], err


def test_dry_run_estimates_the_budgets_of_a_large_space_from_a_sample(files, capsys, monkeypatch):
    import runtime.study.preview as preview

    monkeypatch.setattr(preview, "EXHAUSTIVE", 4)
    monkeypatch.setattr(preview, "SAMPLE", 3)
    study = _study(files, "name: s\nsearch: {spec: tiny.spec, recipe: r.yaml, objective: {step: train}}\n")
    assert main(["study", str(study), "--out", str(files / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  8 configuration(s); about " in out and " of 3 drawn)" in out, out


def test_a_search_checks_budgets_at_the_training_input_as_its_runs_do(files, capsys):
    """A MACs budget depends on the input: a spec declared at 32x32 and trained at 8x8 is judged at 8x8,
    as every run judges its spec (the search once used the spec's own input, rejecting good configurations)."""
    big = files / "big.spec"
    big.write_text(TINY.replace("input 3x8x8", "input 3x32x32")
                   .replace("budget params <= 5000", "budget params <= 5000\n    budget macs <= 1_000_000"))
    (files / "r8.yaml").write_text(RECIPE.replace("name: r\n", "name: r\ninput: 3x8x8\n"))

    def analysed(shape):
        return {(w, d): compiler.analyse(compiler.compile_spec(big, param_strings={"width": str(w), "depth": str(d)},
                                                               input_shape=shape))
                for w in (4, 8, 16, 48) for d in (1, 2)}

    at8, at32 = analysed((3, 8, 8)), analysed((3, 32, 32))
    meet = sum(a.ok for a in at8.values())
    assert meet > sum(a.ok for a in at32.values())  # the input decides here
    study = _study(files, "name: s\nsearch: {spec: big.spec, recipe: r8.yaml, trials: 2, sampler: grid, "
                          "objective: {step: train}}\n")
    assert main(["study", str(study), "--out", str(files / "out"), "--dry-run"]) == 0
    assert f"8 configuration(s); {meet} meet every budget" in capsys.readouterr().out
    assert main(["study", str(study), "--out", str(files / "out"), "--device", "cpu"]) == 0, capsys.readouterr().err
    for r in _results(files / "out"):
        a = at8[tuple(json.loads(r["model_params"])[k] for k in ("width", "depth"))]
        assert (r["status"] == "rejected") == (not a.ok), r
        assert int(r["macs"]) == a.macs, r


def _budget(files, limit: int):
    (files / "tight.spec").write_text(TINY.replace("budget params <= 5000", f"budget params <= {limit}"))
    return "name: s\nsearch: {spec: tight.spec, recipe: r.yaml, trials: 3, sampler: tpe, objective: {step: train}}\n"


def test_a_search_whose_space_meets_no_budget_is_refused_before_any_trial(files, capsys):
    """Every draw would be rejected: the search drew for ever (found by hand: 500 rejections a minute)."""
    study = _study(files, _budget(files, 10))
    assert main(["study", str(study), "--out", str(files / "out")]) == 2
    err = capsys.readouterr().err
    assert "none of the 8 configuration(s)" in err and "meets its budgets at the training input 3x8x8" in err, err
    assert not (files / "out").exists()


def test_a_search_with_fewer_fitting_configurations_than_trials_trains_each_once(files, capsys):
    study = _study(files, _budget(files, 500))  # width 4 at depth 1 and 2: 326 and 482 parameters
    assert main(["study", str(study), "--out", str(files / "out"), "--device", "cpu"]) == 0
    assert "search: 2 configuration(s) meet the budgets: 2 trial(s), not 3" in capsys.readouterr().out
    rows = _results(files / "out")
    trained = sorted(json.loads(r["model_params"])["depth"] for r in rows if r["status"] == "done")
    assert trained == [1, 2], rows  # each fitting configuration: a configuration drawn again is not a trial
    assert {r["status"] for r in rows} <= {"done", "repeat", "rejected"}, rows


def test_a_search_draws_only_the_values_its_space_declares(files, capsys):
    """`width in [4, 8, 16, 48]` is four choices: TPE once drew it as the range 4..48 step 4 and trained
    width 28, which the space does not hold."""
    study = _study(files, "name: s\nsearch: {spec: tiny.spec, recipe: r.yaml, trials: 3, sampler: tpe, "
                          "objective: {step: train}}\n")
    assert main(["study", str(study), "--out", str(files / "out"), "--device", "cpu"]) == 0
    drawn = [json.loads(r["model_params"]) for r in _results(files / "out")]
    assert len(drawn) >= 3 and all(p["width"] in (4, 8, 16, 48) and p["depth"] in (1, 2) for p in drawn), drawn


def test_a_search_stops_after_many_draws_in_a_row_over_budget(files, capsys, monkeypatch):
    """A space too large to count at the start, where almost nothing fits, ends instead of drawing on."""
    import runtime.study.engine as engine

    monkeypatch.setattr(engine, "COUNTED_SPACE", 0)
    monkeypatch.setattr(engine, "FRUITLESS_IN_A_ROW", 3)
    study = _study(files, _budget(files, 10))
    assert main(["study", str(study), "--out", str(files / "out")]) == 0
    out = capsys.readouterr().out
    assert "the last 3 configurations drawn all broke a budget or were drawn before" in out
    assert out.count("study s: trials:") == 1, out  # the end only: rejected draws add no progress line or plot
    assert [r["status"] for r in _results(files / "out")] == ["rejected"] * 3
    table, notes = (files / "out" / "summary.md").read_text().split("Stopped, failed or rejected:")
    names = {r["name"] for r in _results(files / "out")}
    assert notes.split().count("-") == len(names) == table.count("| rejected |")  # a configuration once


def test_the_pruner_sees_only_the_epochs_that_train_the_measured_model(files, capsys):
    """A teacher trained in every trial says nothing of the configuration drawn: its epochs once went
    to the pruner as the objective's, and could stop trials on the teacher's noise."""
    _kd_files(files)
    (files / "kd.yaml").write_text((files / "kd.yaml").read_text().replace("epochs: 2}", "epochs: 3}")
                                   .replace("epochs: 1}", "epochs: 2}"))
    study = _study(files, "name: s\nsearch: {spec: tiny.spec, recipe: kd.yaml, trials: 2, sampler: random, "
                          "pruner: median, objective: {step: distill}}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    trained = [t for t in optuna.load_study(study_name="s", storage=_journal(out)).get_trials()
               if t.user_attrs.get("status") == "done"]
    assert len(trained) == 2 and all(sorted(t.intermediate_values) == [1, 2] for t in trained), \
        [t.intermediate_values for t in trained]  # the distillation's 2 epochs, not the teacher's 3 before them


def _kd_files(files):
    (files / "teach.spec").write_text("model teach(classes: int = 10) { input 3x8x8 conv(4) bn relu gap flatten "
                                      "linear(classes) }\n")
    (files / "kd.yaml").write_text(
        "name: kd\ndata: {limit_per_class: 8}\nmodels:\n  teacher: {spec: teach.spec}\nsteps:\n"
        "  - {name: teacher, kind: train, model: teacher, epochs: 2}\n"
        "  - {name: distill, kind: distill, teacher: teacher, epochs: 1}\n")


@pytest.mark.parametrize("share", [True, False])
def test_runs_of_a_study_share_the_steps_they_have_in_common(files, capsys, share):
    """Every run here trains the same teacher: with `share_steps` (the default) it trains once and
    the other runs link its files; the students, all different, each distil their own."""
    _kd_files(files)
    study = _study(files, f"name: s\nspec: tiny.spec\nrecipe: kd.yaml\nshare_steps: {str(share).lower()}\n"
                          "runs:\n  - {name: a}\n  - {name: b, set: {steps.distill.temperature: 8}}\n"
                          "  - {name: c, params: {width: 4}}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--dry-run"]) == 0
    preview = capsys.readouterr().out
    assert ("  teacher: a, b, c\n" in preview) == share and "distill:" not in preview, preview
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    steps = {n: {e["name"]: e for e in json.loads((out / "trials" / n / "report.json").read_text())["steps"]}
             for n in "abc"}
    teacher = sorted(steps[n]["teacher"]["status"] for n in "abc")
    assert teacher == (["ran", "reused", "reused"] if share else ["ran"] * 3), steps
    assert all(steps[n]["distill"]["status"] == "ran" for n in "abc")
    files_of = [(out / "trials" / n / steps[n]["teacher"]["model_file"]) for n in "abc"]
    if share:  # the same weights, linked rather than copied
        assert len({f.read_bytes() for f in files_of}) == 1 and len({f.stat().st_ino for f in files_of}) == 1
    rows = {r["name"]: r for r in _results(out)}
    assert all(rows[n]["status"] == "done" and float(rows[n]["val_accuracy"]) >= 0 for n in "abc"), rows


def test_workers_seed_their_samplers_apart(monkeypatch):
    """Identically seeded workers draw the same configurations: one runs each, the other waits it out."""
    from runtime.study.samplers import worker_seed

    monkeypatch.delenv("NCCOMPILE_WORKER_INDEX", raising=False)
    assert worker_seed(7, shared_storage=False) == 7  # one local worker: the study's own seed
    monkeypatch.setenv("NCCOMPILE_WORKER_INDEX", "1")
    assert worker_seed(7, shared_storage=False) == 8
    shared = worker_seed(7, shared_storage=True)  # machines sharing a database: apart by host name too
    assert shared != 8 and 0 <= shared < 2 ** 32


def test_a_configuration_another_worker_runs_is_a_duplicate_and_a_held_run_a_failure(files, capsys):
    """A drawn configuration whose folder another live run holds is the other worker's (status
    `duplicate`, not a row; it once failed the trial); a fixed run's held folder is a failure to report."""
    out = files / "out"
    fitting = [f"search-width{w}-depth{d}" for w in (4, 8, 16) for d in (1, 2) if (w, d) != (16, 2)]
    for name in [*fitting[1:], "mine"]:  # every fitting configuration but one, and a fixed run
        (out / "trials" / name).mkdir(parents=True)
        (out / "trials" / name / ".nccompile.lock").write_text(f"{os.getpid()} {socket.gethostname()}")
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns: [{name: mine}]\n"
                          "search: {spec: tiny.spec, recipe: r.yaml, trials: 1, sampler: random, "
                          "objective: {step: train}}\n")
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = {r["name"]: r for r in _results(out)}
    assert rows["mine"]["status"] == "failed" and "another nccompile run" in rows["mine"]["error"], rows
    assert rows[fitting[0]]["status"] == "done", rows
    assert not any(name in rows for name in fitting[1:]), rows  # drawn, found running elsewhere: no row


@pytest.mark.parametrize("text, fragment", [
    ("name: s\nspec: tiny.spec\nruns:\n  - {name: a, recipe: r.yaml}\n  - {name: b, recipe: nope}\n",
     "runs[1] (b):"),
    ("name: s\nrecipe: r.yaml\nruns:\n  - {name: a, spec: missing.spec}\n", "runs[0] (a).spec: no such file"),
    ("name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a, set: {steps.trian.epochs: 2}}\n",
     "no step `trian`"),
    ("name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a, params: {wdith: 4}}\n", "no parameter `wdith`"),
    ("name: s\nspec: tiny.spec\nrecipe: r.yaml\ngrid: {params: {width: []}}\n", "grid.params.width: an empty list"),
    ("name: s\nsearch: {spec: tiny.spec, recipe: r.yaml, objective: {step: quantize}}\n",
     "search.objective.step: no step `quantize`"),
    ("name: s\nspec: tiny.spec\nrecipe: r.yaml\nrunz: []\n", "unknown key `runz`; did you mean `runs`?"),
    ("name: s\nsearch: {spec: tiny.spec, recipe: r.yaml, sampler: tpee, objective: {step: train}}\n",
     "`search.sampler`: Input should be 'tpe', 'random' or 'grid' (got 'tpee')"),
    ("name: s\nspec: tiny.spec\nrecipe: r.yaml\n", "nothing to run"),
    ("name: ../up\nspec: tiny.spec\nrecipe: r.yaml\nruns: [{name: a}]\n", "used in file paths"),
    # its trials' folders are `trials/NAME-...`: `../../x` put them outside the study directory
    ("name: s\nsearch: {name: ../../x, spec: tiny.spec, recipe: r.yaml, objective: {step: train}}\n",
     "the search's name '../../x' is used in file paths"),
    ("name: s\nspec: tiny.spec\nrecipe: r.yaml\ngrid: {set: {seed: %s, optimizer.lr: %s}}\n"
     % (list(range(101)), [0.001 * i for i in range(1, 101)]), "101 x 100 = 10,100 points, over the limit of 10,000"),
    ("name: s\nsearch: {spec: tiny.spec, recipe: r.yaml, seed: -1, objective: {step: train}}\n",
     "`search.seed`: Input should be greater than or equal to 0 (got -1)"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_bad_studies_are_refused_with_the_place_before_any_trial_runs(files, capsys, text, fragment, dry_run):
    study = _study(files, text)
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), *dry_run]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err
    assert not (out / "trials").exists()


def test_an_interrupted_trial_is_resumed_by_the_next_start(files, capsys):
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a}\n  - {name: b}\n")
    out = files / "out"
    from runtime.study.engine import storage_for

    # a worker took `a` and died (its process is gone): the trial is left RUNNING
    s = optuna.create_study(storage=storage_for(None, out), study_name="s", direction="maximize")
    s.enqueue_trial({"run": "a"}, user_attrs={"run": "a"})
    t = s.ask()
    t.suggest_categorical("run", ["a", "b"])
    t.set_user_attr("worker", f"{socket.gethostname()}:999999999")
    t.set_user_attr("status", "running")
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = _results(out)
    assert sorted(r["name"] for r in rows) == ["a", "b"] and all(r["status"] == "done" for r in rows)
    states = [tr.state for tr in s.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the dead one, kept for the record


def test_two_workers_run_each_trial_exactly_once(files):
    names = [f"r{i}" for i in range(6)]
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n"
                   + "".join(f"  - {{name: {n}, params: {{width: {4 + i}}}}}\n" for i, n in enumerate(names)))
    out = files / "out"
    env = dict(os.environ, CI="1")
    done = subprocess.run([sys.executable, "-m", "runtime", "study", str(study), "--out", str(out), "--workers", "2",
                           "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _results(out)
    assert sorted(r["name"] for r in rows) == names and all(r["status"] == "done" for r in rows)
    s = optuna.load_study(study_name="s", storage=_journal(out))
    ran = [t for t in s.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["run"] for t in ran) == names  # none lost, none twice
    workers = {t.user_attrs["worker"] for t in ran}
    assert len(workers) == 2, workers  # both workers took trials
    for n in names:
        log = json.loads((out / "trials" / n / "state.json").read_text())
        assert log  # each run directory written by one ordinary run


def _journal(out):
    from runtime.study.engine import storage_for

    return storage_for(None, out)


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _get(app, path: str) -> dict:
    """One GET through a WSGI app, in process: its JSON answer."""
    from io import BytesIO
    from wsgiref.util import setup_testing_defaults

    route, _, query = path.partition("?")
    environ = {"PATH_INFO": route, "QUERY_STRING": query, "REQUEST_METHOD": "GET", "wsgi.input": BytesIO()}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_optuna_dashboard_shows_a_studys_trials_with_what_the_summary_shows(files, capsys, storage):
    """The dashboard's own app on the study's storage (its journal file, or a database): its HTTP API lists
    the study and each trial with file bytes, parameters, MACs, status and run directory, as results.csv has
    them."""
    dashboard = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed")

    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a}\n"
                          "  - {name: b, params: {width: 16}}\n")
    out = files / "out"
    url = f"sqlite:///{files / 'study.db'}" if storage == "sqlite" else None
    assert main(["study", str(study), "--out", str(out), "--device", "cpu", *(["--storage", url] if url else [])]) \
        == 0, capsys.readouterr().err
    app = dashboard.wsgi(url or str(out / "study.journal"))  # as `optuna-dashboard URL|OUT/study.journal` opens it
    (listed,) = _get(app, "/api/studies")["study_summaries"]
    assert listed["study_name"] == "s"
    trials = _get(app, f"/api/studies/{listed['study_id']}?after=0")["trials"]
    rows = {r["name"]: r for r in _results(out)}
    assert len(trials) == 2
    for t in trials:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        row = rows[attrs["run"]]
        assert attrs["status"] == row["status"] == "done"
        for key in ("file_bytes", "params_count", "macs"):
            assert str(attrs[key]) == row[key], key
        assert attrs["run_dir"].endswith(f"trials/{attrs['run']}")


def test_a_study_in_one_sqlite_file_for_one_worker(files, capsys):
    """The README's single-machine database: `sqlite:///`, one worker, Optuna's own file."""
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a}\n  - {name: b}\n")
    url = f"sqlite:///{files / 'study.db'}"
    assert main(["study", str(study), "--out", str(files / "out"), "--storage", url, "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    assert [r["name"] for r in _results(files / "out")] == ["a", "b"]
    done = optuna.load_study(study_name="s", storage=url).get_trials()
    assert sorted(t.user_attrs["run"] for t in done if t.state == optuna.trial.TrialState.COMPLETE) == ["a", "b"]


def test_a_postgresql_url_without_a_driver_takes_an_installed_one(monkeypatch):
    import importlib.util

    from runtime.study import engine

    present = {"pg8000"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in present else None)
    assert engine.with_driver("postgresql://u:p@h/db") == "postgresql+pg8000://u:p@h/db"
    assert engine.with_driver("postgres://u@h/db") == "postgresql+pg8000://u@h/db"
    present.add("psycopg")  # the `postgres` extra's driver comes first
    assert engine.with_driver("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine.with_driver("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"  # as written
    assert engine.with_driver("sqlite:///s.db") == "sqlite:///s.db"
    present.clear()
    with pytest.raises(NcError, match=r"(?s)no PostgreSQL driver is installed.*pip install -e '\.\[postgres\]'"):
        engine.with_driver("postgresql://u@h/db")


@pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("pg_ctl") is None,
                    reason="no PostgreSQL server here (initdb and pg_ctl not found)")
def test_two_workers_share_a_postgresql_study(files):
    pytest.importorskip("pg8000", reason="the pure-Python PostgreSQL driver pg8000 is not installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
    import pwd
    import tempfile

    home = tempfile.mkdtemp(prefix="nccompile-pg-")
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(home, pw.pw_uid, pw.pw_gid)
    data, port = os.path.join(home, "data"), str(54000 + os.getpid() % 1000)
    init = subprocess.run(_as_postgres(["initdb", "-D", data, "-U", "postgres", "--auth=trust"]),
                          capture_output=True, text=True)
    if init.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"initdb failed here: {init.stderr.strip()[-300:]}")
    started = subprocess.run(_as_postgres(["pg_ctl", "-D", data, "-l", os.path.join(home, "log"), "-w", "-o",
                                           f"-p {port} -k {home} -c listen_addresses=localhost", "start"]),
                             capture_output=True, text=True)
    try:
        if started.returncode != 0:
            pytest.skip(f"PostgreSQL did not start here: {started.stderr.strip()[-300:]}")
        names = ["a", "b", "c", "d"]
        study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n"
                       + "".join(f"  - {{name: {n}}}\n" for n in names))
        url = f"postgresql+pg8000://postgres@localhost:{port}/postgres"
        done = subprocess.run([sys.executable, "-m", "runtime", "study", str(study), "--out", str(files / "out"),
                               "--workers", "2", "--storage", url, "--device", "cpu"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, CI="1"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert sorted(r["name"] for r in _results(files / "out")) == names
        s = optuna.load_study(study_name="s", storage=url)
        ran = [t.user_attrs["run"] for t in s.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(ran) == names
        # the URL a PostgreSQL user writes first, with the `postgres` extra's driver (psycopg 3)
        pytest.importorskip("psycopg", reason="the `postgres` extra (psycopg 3) is not installed")
        plain = f"postgresql://postgres@localhost:{port}/postgres"
        study2 = _study(files, "name: s2\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: e}\n")
        done = subprocess.run([sys.executable, "-m", "runtime", "study", str(study2), "--out", str(files / "out2"),
                               "--storage", plain, "--device", "cpu"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, CI="1"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert [r["name"] for r in _results(files / "out2")] == ["e"]
        from runtime.study.engine import with_driver

        assert with_driver(plain).startswith("postgresql+psycopg://")
    finally:
        subprocess.run(_as_postgres(["pg_ctl", "-D", data, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@needs_data
def test_q2_kd_acceptance(tmp_path, capsys, in_root):
    """The issue's command, with a small teacher so that the suite stays quick."""
    teacher = tmp_path / "teacher.spec"
    teacher.write_text(SMALL_TEACHER)
    out = tmp_path / "q2"
    args = ["study", str(_q2_with_small_teacher(tmp_path, teacher)), "--data", str(DATA), "--epochs", "1",
            "--set", "data.limit_per_class=20", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    rows = _results(out)
    assert sum(r["status"] == "done" for r in rows) >= 2
    assert {"params_count", "file_bytes", "val_accuracy"} <= set(rows[0])
    assert (out / "summary.md").exists() and (out / "pareto.png").exists()
    before = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/report.json")} == before


def _q2_with_small_teacher(tmp_path, teacher):
    text = (ROOT / "specs/studies/q2_kd.yaml").read_text().replace("spec: ../student.spec",
                                                                     f"spec: {ROOT / 'specs/student.spec'}")
    text = text.replace("set: {steps.teacher.epochs: 1}", f"set: {{steps.teacher.epochs: 1, models.teacher.spec: "
                                                           f"{teacher}}}")
    text = text.replace("set: {steps.teacher.epochs: 4}", f"set: {{steps.teacher.epochs: 4, models.teacher.spec: "
                                                           f"{teacher}}}")
    path = tmp_path / "q2_kd.yaml"
    path.write_text(text)
    return path


def test_ctrl_c_leaves_the_storage_consistent_and_the_next_start_resumes(files, capsys, monkeypatch):
    import runtime.study.trials as engine

    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a}\n  - {name: b}\n")
    out = files / "out"
    real = engine.run_recipe

    def interrupted(opts):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run_recipe", interrupted)
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 130
    s = optuna.load_study(study_name="s", storage=_journal(out))
    states = {t.user_attrs.get("run"): (t.state, t.user_attrs.get("status")) for t in s.get_trials()}
    assert states["a"] == (optuna.trial.TrialState.FAIL, "interrupted")
    assert states["b"][0] == optuna.trial.TrialState.WAITING  # untouched, still queued
    monkeypatch.setattr(engine, "run_recipe", real)
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0
    rows = _results(out)
    assert sorted(r["name"] for r in rows) == ["a", "b"] and all(r["status"] == "done" for r in rows)


def test_a_pruning_study_draws_the_report_q3_figure(files, capsys):
    (files / "p.yaml").write_text(
        "name: p\ndata: {limit_per_class: 8}\nsteps:\n  - {name: train, kind: train, epochs: 1}\n"
        "  - {name: prune, kind: prune, importance: bn, rate: 0.9, iterations: 2,"
        " finetune: {kind: train, epochs: 1}}\n")
    study = _study(files, "name: q3\nspec: tiny.spec\nrecipe: p.yaml\ngrid:\n  params: {width: [16]}\n"
                          "  set: {steps.prune.rate: [0.9, 0.5]}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = {r["name"]: r for r in _results(out)}
    assert int(rows["grid-width16-rate0p5"]["params_count"]) < int(rows["grid-width16-rate0p9"]["params_count"])
    assert (out / "pruning.png").read_bytes()[:4] == b"\x89PNG"
    assert "trials: 2 done" in capsys.readouterr().out


def test_trials_is_refused_for_a_study_without_a_search(files, capsys):
    """`--trials 0` on a grid ran the whole grid: the flag counts only a search's draws."""
    study = _study(files, "name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns: [{name: a}]\n")
    assert main(["study", str(study), "--trials", "0", "--out", str(files / "out")]) == 2
    assert "--trials counts a search's trials" in capsys.readouterr().err
    assert not (files / "out").exists()


def test_a_run_whose_file_will_break_a_budget_is_a_rejected_result(files, capsys):
    """Known before any work (the quantized file's size is exact): the study lists it as rejected,
    with the budget that fails, and runs the others."""
    (files / "q.yaml").write_text("name: q\nsteps:\n  - {name: train, kind: train, epochs: 1}\n"
                                  "  - {name: q, kind: quantize, format: int8}\n")
    # int8: 2,610 bytes; every tensor kept as fp32: about twice that
    (files / "b.spec").write_text(TINY.replace("budget params <= 5000", "budget bytes(int8) <= 4_000"))
    study = _study(files, "name: s\nrecipe: q.yaml\nruns:\n  - {name: small, spec: tiny.spec}\n"
                          "  - {name: capped, spec: b.spec, set: {'steps.q.keep': ['*']}}\n")
    assert main(["study", str(study), "--out", str(files / "out"), "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = {r["name"]: r for r in _results(files / "out")}
    assert rows["capped"]["status"] == "rejected", rows
    assert "bytes(int8) <= 4,000 fails" in rows["capped"]["error"] and "(predicted file)" in rows["capped"]["error"]
    assert rows["small"]["status"] == "done"
    capped = compiler.analyse(compiler.compile_spec(files / "b.spec"))  # its size is known, as a search's is
    assert (int(rows["capped"]["params_count"]), int(rows["capped"]["macs"])) == (capped.params, capped.macs)


def test_a_grid_search_asked_for_more_trials_than_points_runs_each_point_once(files, capsys):
    """Optuna's grid stops its study once every point is drawn, which works only inside `optimize`:
    a grid search of all its points was an internal error at its last trial."""
    study = _study(files, "name: s\nsearch:\n  spec: tiny.spec\n  recipe: r.yaml\n  trials: 20\n  sampler: grid\n"
                          "  objective: {step: train}\n")
    out = files / "out"
    assert main(["study", str(study), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "search: the grid has 8 point(s): 8 trial(s), not 20" in capsys.readouterr().out
    rows = _results(out)
    points = {r["model_params"] for r in rows if r["status"] in ("done", "rejected")}
    assert len(points) == 8 and len(rows) == 8, rows  # width 4 values x depth 2 values, each once
