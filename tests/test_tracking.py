"""`--track tensorboard|mlflow`: event files and MLflow stores, read back with the libraries' own readers."""
from __future__ import annotations

import csv
import json

import pytest

from runtime.cli import main


@pytest.mark.slow  # a real (small) run
def test_a_tracked_run_shows_its_epochs_steps_images_and_recipe_in_tensorboard(tmp_path, capsys, in_root):
    pytest.importorskip("tensorboard", reason="needs the `tracking` extra (tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  - {name: t, kind: train, epochs: 2}\n"
                      "  - {name: q, kind: quantize, format: int8}\n  - {name: e, kind: evaluate}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--input", "3x16x16", "--device", "cpu",
                 "--set", "data.limit_per_class=5", "--out", str(out), "--track", "tensorboard"]) == 0, \
        capsys.readouterr().err[-2000:]
    report = json.loads((out / "report.json").read_text())["steps"]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    accuracy = [e.value for e in events.Scalars("t/val_accuracy")]
    assert [e.step for e in events.Scalars("t/val_accuracy")] == [1, 2]  # one point per epoch
    assert report[0]["metrics"]["val_accuracy"] == pytest.approx(max(accuracy))  # the step keeps its best epoch
    assert [e.value for e in events.Scalars("steps/file_bytes")] == [s["file_bytes"] for s in report]
    assert [e.value for e in events.Scalars("steps/params")] == [s["params"] for s in report]
    assert events.Scalars("t/lr") and events.Scalars("t/train_loss")
    assert "e/confusion" in events.Tags()["images"]
    assert {"recipe/text_summary", "spec/text_summary", "budgets/text_summary"} <= set(events.Tags()["tensors"])


def test_tracking_needs_a_recipe_and_a_known_tracker(capsys):
    assert main(["specs/student.spec", "--track", "tensorboard"]) == 2
    assert "--track need --recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # argparse's own usage error
        main(["specs/student.spec", "--recipe", "scratch", "--track", "mlflowx"])
    assert stopped.value.code == 2


def test_without_the_extra_a_tracked_run_names_it_and_writes_nothing(tmp_path, capsys, in_root, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", "scratch", "--out", str(out), "--track", "tensorboard"]) == 2
    assert "pip install -e '.[tracking]'" in capsys.readouterr().err and not out.exists()


def _mlflow_store(tmp_path, monkeypatch):
    """A fresh MLflow store for the test, as a user points MLflow at one: MLFLOW_TRACKING_URI."""
    pytest.importorskip("mlflow", reason="needs the `tracking` extra (mlflow)")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test")
    # artifacts in the test's folder: MLflow's default for a database store is ./mlruns, here the checkout
    MlflowClient().create_experiment("test", artifact_location=(tmp_path / "mlruns").as_uri())
    return MlflowClient


def _runs(client):
    experiment = client.get_experiment_by_name("test")
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.mark.slow  # a real (small) run
def test_a_tracked_run_is_an_mlflow_run_with_a_nested_run_per_step(tmp_path, capsys, in_root, monkeypatch):
    client = _mlflow_store(tmp_path, monkeypatch)()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndata: {batch_size: 16}\nsteps:\n  - {name: t, kind: train, epochs: 2}\n"
                      "  - {name: q, kind: quantize, format: int8}\n  - {name: x, kind: export}\n"
                      "  - {name: e, kind: evaluate}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--input", "3x16x16", "--device", "cpu",
                 "--set", "data.limit_per_class=5", "--param", "base=8", "--out", str(out),
                 "--track", "mlflow"]) == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "report.json").read_text())["steps"]
    runs = _runs(client)
    (top,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    steps = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == top.info.run_id}
    assert set(steps) == {"t", "q", "x", "e"} and len(runs) == 5
    assert top.info.status == "FINISHED" and top.info.run_name == "run"
    assert top.data.tags["nccompile.run_dir"] == str(out.resolve())
    # params: the spec's parameters and the recipe's settings; each step's settings on its own run
    assert top.data.params["spec.base"] == "8" and top.data.params["spec.input"] == "3x16x16"
    assert top.data.params["recipe.data.batch_size"] == "16"
    assert steps["t"].data.params["epochs"] == "2" and steps["q"].data.params["format"] == "int8"
    # metrics: the final model on the run (its history one point per step), the epochs on the step's run
    final = report[-1]
    assert top.data.metrics["file_bytes"] == final["file_bytes"] and top.data.metrics["params"] == final["params"]
    history = client.get_metric_history(top.info.run_id, "file_bytes")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(i, s["file_bytes"]) for i, s in enumerate(report)]
    curve = client.get_metric_history(steps["t"].info.run_id, "val_accuracy")
    assert sorted(m.step for m in curve) == [1, 2]
    assert report[0]["metrics"]["val_accuracy"] == pytest.approx(max(m.value for m in curve))
    assert steps["q"].data.metrics["result.file_bytes"] == report[1]["file_bytes"]
    # artifacts: the run's report, recipe and spec; each step's files as the run directory holds them
    assert {"report.json", "recipe.yaml", "spec.txt", "budgets.txt"} <= \
        {a.path for a in client.list_artifacts(top.info.run_id)}
    exported = {a.path: a.file_size for a in client.list_artifacts(steps["x"].info.run_id, "steps/x")}
    for name in ("student.onnx", "student.safetensors"):
        assert exported[f"steps/x/{name}"] == (out / "steps" / "x" / name).stat().st_size
    assert "steps/e/confusion.png" in {a.path for a in client.list_artifacts(steps["e"].info.run_id, "steps/e")}


@pytest.mark.slow  # a real (small) study
def test_a_tracked_study_is_an_mlflow_run_with_a_nested_run_per_trial(tmp_path, capsys, in_root, monkeypatch):
    client = _mlflow_store(tmp_path, monkeypatch)()
    (tmp_path / "tiny.spec").write_text("model tiny(classes: int = 10, width: int = 8) {\n    input 3x8x8\n"
                                        "    conv(width) bn relu\n    gap flatten\n    head: linear(classes)\n}\n")
    (tmp_path / "r.yaml").write_text("name: r\ndata: {limit_per_class: 4}\nsteps:\n  - {name: train, kind: train, "
                                     "epochs: 1}\n")
    (tmp_path / "s.yaml").write_text("name: s\nspec: tiny.spec\nrecipe: r.yaml\nruns:\n  - {name: a}\n"
                                     "  - {name: b, params: {width: 4}}\n")
    out = tmp_path / "out"
    argv = ["study", str(tmp_path / "s.yaml"), "--out", str(out), "--device", "cpu", "--track", "mlflow"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    runs = _runs(client)
    (study,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id}
    assert study.info.run_name == "study-s" and study.info.status == "FINISHED" and set(trials) == {"a", "b"}
    assert trials["b"].data.params["spec.width"] == "4" and trials["a"].data.params["spec.width"] == "8"
    assert {"results.csv", "summary.md"} <= {a.path for a in client.list_artifacts(study.info.run_id)}
    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    for name, run in trials.items():
        assert run.data.metrics["params"] == float(rows[name]["params_count"])
    assert len(client.get_metric_history(study.info.run_id, "objective")) == 2
    # a second start finds the study done: the same study run, no new trial runs
    assert main(argv) == 0
    assert len(_runs(client)) == len(runs)


def test_without_mlflow_a_tracked_run_names_the_extra(tmp_path, capsys, in_root, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", "scratch", "--out", str(out), "--track", "mlflow"]) == 2
    assert "--track mlflow: the mlflow package is not installed; pip install -e '.[tracking]'" in \
        capsys.readouterr().err and not out.exists()
