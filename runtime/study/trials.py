"""One trial of a study: its run, with heartbeats and early stopping, and the numbers it leaves in the storage."""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import optuna

from compiler.errors import NcError

from .. import ctrl_c
from ..run.runner import run as run_recipe
from ..rundir import RunDirBusy

HEARTBEAT_SECONDS = 20


class StopTrial(Exception):
    """Raised from the per-epoch hook when the pruner stops a poor trial."""


def execute(study, trial, storage, options, run_dir: Path, name: str, objective_step: str | None,
            drawn: bool = False, watched: frozenset[str] = frozenset()) -> None:
    """Run the trial's recipe (`options(on_epoch)` gives its runner options) and tell the study how it went.
    `drawn`: a sampler's draw, which another worker may have drawn at the same moment and be running.
    `watched`: the steps whose epochs the pruner sees (each epoch's label starts with its step's name)."""
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("heartbeat", time.time())
    trial.set_user_attr("status", "running")
    trial.set_user_attr("name", name)
    trial.set_user_attr("run_dir", str(run_dir))  # where optuna-dashboard's viewer finds the run's files
    epochs = [0]

    def on_epoch(label, row):
        if objective_step is None or label.split(" ", 1)[0] not in watched:
            return
        epochs[0] += 1
        trial.report(float(row["val_accuracy"]), epochs[0])
        if trial.should_prune():
            raise StopTrial(f"stopped after {epochs[0]} epoch(s) by the pruner "
                            f"(val accuracy {row['val_accuracy']:.4f})")

    start = time.time()
    try:
        with _Heartbeat(storage, trial):
            run_recipe(options(on_epoch))
    except RunDirBusy as err:
        if drawn:  # another worker drew the same configuration at the same moment: its run is the result
            trial.set_user_attr("status", "duplicate")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:  # a run of the user's own holds a fixed trial's folder
            _failed(study, trial, err, start)
        return
    except StopTrial as err:
        trial.set_user_attr("status", "pruned")
        trial.set_user_attr("error", str(err))
        trial.set_user_attr("seconds", time.time() - start)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    except Exception as err:  # a failed trial is a result; the study goes on
        if not ctrl_c.fired():
            _failed(study, trial, err, start)
            return
        _interrupted(study, trial)  # a Ctrl-C that a library's import turned into another exception
        raise KeyboardInterrupt from err
    except KeyboardInterrupt:
        _interrupted(study, trial)
        raise
    record = trial_record(run_dir, objective_step)
    for k, v in record.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("status", "done")
    trial.set_user_attr("seconds", time.time() - start)
    value = record.get("objective")
    if value is None or not math.isfinite(value):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)


def _interrupted(study, trial) -> None:
    trial.set_user_attr("status", "interrupted")  # the next start enqueues it again; it resumes
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _failed(study, trial, err: Exception, start: float) -> None:
    trial.set_user_attr("status", "failed")
    trial.set_user_attr("error", first_lines(err) if isinstance(err, NcError)
                        else f"internal error: {type(err).__name__}: {err}")
    trial.set_user_attr("seconds", time.time() - start)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def resumed_numbers(trials) -> set[int]:
    """Trials that another trial took over (it resumes their run)."""
    return {t.user_attrs["resumes"] for t in trials if "resumes" in t.user_attrs}


def trial_record(run_dir: Path, objective_step: str | None) -> dict:
    """The numbers a trial's run reports: its last step's model, and the objective step's accuracy."""
    report = json.loads((run_dir / "report.json").read_text())
    steps = report["steps"]
    last = steps[-1]
    chosen = next((s for s in steps if s["name"] == objective_step), last) if objective_step else last
    # the trade-off curve of any step that reports one (today prune): read from its metrics, not its kind
    points = [p for s in steps for p in s.get("metrics", {}).get("points", [])]
    record = {"params_count": last.get("params"), "macs": last.get("macs"), "file_bytes": last.get("file_bytes"),
              "val_accuracy": last.get("val_accuracy"), "objective": chosen.get("val_accuracy"),
              "objective_step": chosen["name"], "run_dir": str(run_dir)}
    predicted = last.get("latency_ms") or {}
    if predicted:  # a latency budget's target: the first one's prediction, and the deployed file's measured time
        record["latency_ms"] = next(iter(predicted.values()))
    measured = [s["metrics"]["onnx_latency_ms"] for s in steps
                if isinstance(s.get("metrics", {}).get("onnx_latency_ms"), dict)]
    if measured:
        record["measured_latency_ms"] = next(iter(measured[-1].values()))  # the written file's, listed first
    if points:
        record["prune_points"] = [{k: p.get(k) for k in ("run", "iteration", "rate", "params", "val_accuracy")}
                                  for p in points]
    return record


class _Heartbeat:
    """Writes the time into the running trial now and then, so other workers know it is alive."""

    def __init__(self, storage, trial):
        self.storage, self.trial = storage, trial
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(timeout=5)

    def _beat(self):
        while not self.done.wait(HEARTBEAT_SECONDS):
            try:
                self.storage.set_trial_user_attr(self.trial._trial_id, "heartbeat", time.time())
            except Exception:  # the trial finished meanwhile
                return


def first_lines(err: BaseException, n: int = 3) -> str:
    return " / ".join(line.strip() for line in str(err).splitlines()[:n] if line.strip())
