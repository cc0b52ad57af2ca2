"""`--track tensorboard`: the run's event files, read back with TensorBoard's own reader."""
from __future__ import annotations

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
