"""`evaluate` (accuracy, loss, per-class accuracy, confusion matrix) and `predict` (CSV)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from ..files import atomic_write
from ..rundir import write_json
from .base import StepConfig, StepKind, StepResult, register


def _onnx_form(data):
    """`model: {onnx: PATH}` scores an exported ONNX file: the same as `onnx: PATH` (model: student)."""
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        given = dict(data["model"])
        if set(given) != {"onnx"}:
            raise ValueError(f"`model` is a model's name or {{onnx: PATH}}, got keys {sorted(given)}")
        data = {**data, "onnx": given["onnx"]}
        data.pop("model")
    return data


class EvaluateConfig(StepConfig):
    kind: str = "evaluate"
    split: Literal["val", "train"] = "val"
    # an exported ONNX file to score instead of the model's own file (relative: to the run directory,
    # e.g. steps/export/student.onnx); it runs in ONNX Runtime on the CPU
    onnx: str | None = None

    accept_onnx_mapping = model_validator(mode="before")(_onnx_form)


class PredictConfig(StepConfig):
    kind: str = "predict"
    onnx: str | None = None  # as evaluate's

    accept_onnx_mapping = model_validator(mode="before")(_onnx_form)


def scored_module(cfg, ctx):
    """What the step scores: the ONNX file it names, or its model's current file."""
    if cfg.onnx is None:
        return ctx.models[cfg.model].build(ctx.device, ctx.recipe.seed).eval()
    from ..deploy.onnx_module import OnnxModelError, OnnxModule

    path = Path(cfg.onnx) if Path(cfg.onnx).is_absolute() else ctx.run.root / cfg.onnx
    if not path.is_file():
        raise OnnxModelError(f"step `{cfg.name}`: no ONNX file at {path}; an `export` step writes "
                             f"steps/<its name>/<model>.onnx in the run directory")
    return OnnxModule(path, ctx.input_shape, ctx.pipeline("eval").norm)


def _what(cfg) -> str:
    return cfg.model if cfg.onnx is None else cfg.onnx


def csv_cell(text: str) -> str:
    """A cell a spreadsheet shows as text: a leading =, +, - or @ would make it a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


@register
class Evaluate(StepKind):
    kind = "evaluate"
    config = EvaluateConfig

    def needs(self, cfg):
        return [cfg.model]

    def describe(self, cfg):
        return f"evaluate {_what(cfg)} on the {cfg.split} split: accuracy, loss, per-class accuracy, confusion matrix"

    def run(self, cfg: EvaluateConfig, ctx, key: str = "") -> StepResult:
        from ..plots import confusion_matrix

        module = scored_module(cfg, ctx)
        data = ctx.data()
        scores = ctx.evaluate(module, cfg.split)
        acc, loss, matrix = scores.accuracy, scores.loss, scores.confusion
        totals = matrix.sum(1).clamp(min=1)
        per_class = {c: (matrix[i, i] / totals[i]).item() for i, c in enumerate(data.classes)}
        step_dir = ctx.run.step_dir(cfg.name)
        # named after the split scored: a train-split score is never read as validation accuracy
        metrics = {f"{cfg.split}_accuracy": acc, f"{cfg.split}_loss": loss, "split": cfg.split,
                   "per_class_accuracy": per_class, "confusion_matrix": matrix.tolist(), "images": scores.images}
        if ctx.is_main:
            write_json(step_dir / "metrics.json", metrics)
            confusion_matrix(matrix, data.classes, step_dir / "confusion.png",
                             f"{_what(cfg)} on {cfg.split}: accuracy {acc:.3f}")
        ctx.log(f"{cfg.name}: {_what(cfg)} {cfg.split} accuracy {acc:.4f}, loss {loss:.4f}")
        return StepResult(metrics=metrics, files=[f"steps/{cfg.name}/metrics.json", f"steps/{cfg.name}/confusion.png"])


@register
class Predict(StepKind):
    kind = "predict"
    config = PredictConfig

    def needs(self, cfg):
        return [cfg.model]

    def describe(self, cfg):
        return f"predict the unlabeled testing/ images with {_what(cfg)} -> predictions.csv"

    def check(self, cfg, models, listing):
        if "test" not in listing.files:
            return [f"step `{cfg.name}` predicts the unlabeled testing/ images, but the data has none "
                    "(only the food-11 layout has testing/)"]
        return []

    def run(self, cfg: PredictConfig, ctx, key: str = "") -> StepResult:
        data = ctx.data()
        logits = ctx.logits(scored_module(cfg, ctx), "test").cpu()
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["Id", "Category"])
        for ident, label in zip(data.test.ids, logits.argmax(1).tolist()):
            writer.writerow([csv_cell(ident), csv_cell(data.classes[label])])
        path = ctx.run.step_dir(cfg.name) / "predictions.csv"
        if ctx.is_main:
            atomic_write(path, out.getvalue().encode())
        ctx.log(f"{cfg.name}: {len(data.test)} predictions -> {path}")
        return StepResult(metrics={"predictions": len(data.test)}, files=[f"steps/{cfg.name}/predictions.csv"])
