"""`train` (cross-entropy) and `distill` (Hinton's loss against a frozen teacher)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..loop import fit
from ..losses import KD_ALPHA, KD_TEMPERATURE
from .base import StepConfig, StepKind, StepResult, register
from .finetune import teacher_loss


class TrainConfig(StepConfig):
    kind: str = "train"
    epochs: int = Field(10, ge=1)
    lr: float | None = Field(None, gt=0)           # default: the recipe's optimizer.lr
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    unless_checkpoint: bool = False                 # skip when the model comes with a checkpoint


class DistillConfig(TrainConfig):
    kind: str = "distill"
    teacher: str = "teacher"
    temperature: float = Field(KD_TEMPERATURE, gt=0)
    alpha: float = Field(KD_ALPHA, ge=0, le=1)
    teacher_cache: Literal["auto", "always", "never"] = "auto"


def _train(cfg, ctx, key, loss_fn_factory) -> StepResult:
    slot = ctx.models[cfg.model]
    torch.manual_seed(ctx.recipe.seed)
    module = slot.build(ctx.device, ctx.recipe.seed)
    loss_fn = loss_fn_factory(module)
    step_dir = ctx.run.step_dir(cfg.name)
    metrics = fit(ctx, module=module, step_dir=step_dir, key=key, epochs=cfg.epochs, lr=cfg.lr,
                  loss_fn=loss_fn, label=cfg.name)
    path, size = ctx.save(slot, module, cfg.name)
    return StepResult(model_file=path, metrics=metrics, files=[f"steps/{cfg.name}/curves.png"])


@register
class Train(StepKind):
    kind = "train"
    config = TrainConfig
    trains = True

    def produces(self, cfg):
        return [cfg.model]

    def describe(self, cfg):
        return f"train {cfg.model} for {cfg.epochs} epoch(s) with cross-entropy"

    def skip_reason(self, cfg, models):
        if cfg.unless_checkpoint and models[cfg.model].producer == "checkpoint":
            return "checkpoint given"
        return None

    def run(self, cfg: TrainConfig, ctx, key: str = "") -> StepResult:
        def factory(module):
            return lambda logits, y, idx, x: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

        return _train(cfg, ctx, key, factory)


@register
class Distill(StepKind):
    kind = "distill"
    config = DistillConfig
    trains = True

    def needs(self, cfg):
        return [cfg.teacher]

    def produces(self, cfg):
        return [cfg.model]

    def describe(self, cfg):
        return (f"distill {cfg.model} from {cfg.teacher} for {cfg.epochs} epoch(s) "
                f"(T={cfg.temperature:g}, alpha={cfg.alpha:g})")

    def run(self, cfg: DistillConfig, ctx, key: str = "") -> StepResult:
        return _train(cfg, ctx, key, teacher_loss(ctx, cfg.teacher, cfg.temperature, cfg.alpha, cfg.teacher_cache,
                                                  cfg.name))
