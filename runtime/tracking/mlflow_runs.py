"""`--track mlflow`: the run as an MLflow run, each step a nested run.

The store is MLflow's own choice: MLFLOW_TRACKING_URI when set (a server, a database), else its local
default, ./mlflow.db with artifacts in ./mlruns, which `mlflow ui` in the same folder opens (MLflow 3
refuses the old ./mlruns file store). The experiment is MLFLOW_EXPERIMENT_NAME, else "nccompile".

The run: params from the spec (its parameters, input) and the recipe's settings; the recipe, spec and
budgets as text; per step the model's params, MACs, file bytes and accuracy as metrics at the step's
index (so the run's table shows the final model). A step's nested run: its settings as params, its
epochs' scalars per epoch, its numeric results as result.*, and its files (model file, ONNX, plots) as
artifacts.
A study's trial nests under the study's run (study_run).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from .. import ctrl_c

EXPERIMENT = "nccompile"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting (mlflow.utils.mlflow_tags)
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_second")
STEP_METRICS = ("params", "macs", "file_bytes", "val_accuracy", "seconds")
BATCH = 100  # MLflow's limit on params per log_batch call
MAX_VALUE = 6000  # MLflow's limit on a param's value


def client():
    from mlflow.tracking import MlflowClient  # installed: tracking.require() said so before anything ran

    return MlflowClient()


def experiment_id(mlflow_client) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:  # another worker created it at the same moment
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flat(tree, prefix: str = "") -> dict[str, object]:
    """{"data": {"batch_size": 64}} -> {"data.batch_size": 64}; lists by index."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    out: dict[str, object] = {}
    for k, v in items:
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of nested dicts; lists (a confusion matrix) stay in the step's files."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(numbers(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class MLflowRun:
    def __init__(self, out: Path, parent: str | None = None):
        from mlflow.entities import Metric, Param

        self.Metric, self.Param = Metric, Param
        self.client = client()
        self.out = out
        tags = {"nccompile.run_dir": str(out.resolve())}
        if parent:
            tags[PARENT_TAG] = parent
        self.experiment = experiment_id(self.client)  # the run's and its steps'
        self.run_id = self.client.create_run(self.experiment, tags=tags, run_name=out.name).info.run_id
        self.step_settings: dict[str, dict] = {}
        self.children: dict[str, str] = {}  # step name -> its nested run

    def start(self, recipe_text: str, spec_text: str, budgets: list[str], params: dict) -> None:
        recipe = yaml.safe_load(recipe_text)
        self.step_settings = {s["name"]: s for s in recipe.pop("steps", [])}
        self._params(self.run_id, {**{f"spec.{k}": v for k, v in params.items()}, **flat(recipe, "recipe")})
        self.client.log_text(self.run_id, recipe_text, "recipe.yaml")
        self.client.log_text(self.run_id, spec_text, "spec.txt")
        self.client.log_text(self.run_id, "\n".join(budgets) + "\n", "budgets.txt")

    def epoch(self, label: str, row: dict) -> None:
        step = label.split(" ", 1)[0]  # a training step's epochs are labelled by its name
        self._metrics(self._child(step), {k: row[k] for k in EPOCH_METRICS if row.get(k) is not None}, row["epoch"])

    def step(self, index: int, entry: dict) -> None:
        child = self._child(entry["name"])
        self.client.set_tag(child, "nccompile.status", entry["status"])
        results = {**numbers(entry.get("metrics", {})),
                   **{k: entry[k] for k in STEP_METRICS if isinstance(entry.get(k), (int, float))}}
        self._metrics(child, {f"result.{k}": v for k, v in results.items()}, 0)  # apart from the epochs' curves
        self._metrics(self.run_id, {k: entry[k] for k in STEP_METRICS[:4] if isinstance(entry.get(k), (int, float))},
                      index)
        for name in dict.fromkeys([entry.get("model_file"), *entry.get("files", [])]):
            if name and (self.out / name).is_file():
                self.client.log_artifact(child, str(self.out / name), str(Path(name).parent))
        self.client.set_terminated(child, "FINISHED")
        self.children.pop(entry["name"])

    def close(self, error: BaseException | None = None) -> None:
        for name in ("report.json", "report.md"):
            if (self.out / name).is_file():
                self.client.log_artifact(self.run_id, str(self.out / name))
        status = "FINISHED" if error is None else "KILLED" if ctrl_c.fired(error) else "FAILED"
        for child in self.children.values():  # a step that stopped half-way
            self.client.set_terminated(child, status)
        self.client.set_terminated(self.run_id, status)

    def _child(self, step: str) -> str:
        if step not in self.children:
            tags = {PARENT_TAG: self.run_id, "nccompile.step": step}
            run = self.client.create_run(self.experiment, tags=tags, run_name=step)
            self.children[step] = run.info.run_id
            self._params(run.info.run_id, self.step_settings.get(step, {}))
        return self.children[step]

    def _params(self, run_id: str, values: dict) -> None:
        params = [self.Param(k, str(v)[:MAX_VALUE]) for k, v in flat(values).items() if v is not None]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(run_id, params=params[i:i + BATCH])

    def _metrics(self, run_id: str, values: dict, step: int) -> None:
        now = int(time.time() * 1000)
        if values:
            self.client.log_batch(run_id, metrics=[self.Metric(k, float(v), now, step) for k, v in values.items()])


def study_run(name: str, out: Path, known: str | None) -> str:
    """The study's MLflow run, its trials' parent: `known` (a run id the study's storage keeps) when it
    is still there, else a new one."""
    mlflow_client = client()
    if known:
        try:
            mlflow_client.update_run(known, status="RUNNING")
            return known
        except Exception:  # deleted, or another store: start afresh
            pass
    tags = {"nccompile.study_dir": str(out.resolve()), "nccompile.study": name}
    return mlflow_client.create_run(experiment_id(mlflow_client), tags=tags, run_name=f"study-{name}").info.run_id


def study_done(run_id: str, study, files: list[Path]) -> None:
    """The study's outputs as artifacts, and each finished trial's objective at its trial number."""
    mlflow_client = client()
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric("objective", float(t.value), now, t.number) for t in study.get_trials(deepcopy=False)
              if t.value is not None]
    for i in range(0, len(values), 1000):  # MLflow's limit on metrics per log_batch call
        mlflow_client.log_batch(run_id, metrics=values[i:i + 1000])
    for f in files:
        if f.is_file():
            mlflow_client.log_artifact(run_id, str(f))
    mlflow_client.set_terminated(run_id, "FINISHED")
