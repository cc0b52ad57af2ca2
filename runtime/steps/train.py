"""`train` (cross-entropy) and `distill` (Hinton's loss against a frozen teacher)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import Field

from ..loop import fit
from ..losses import kd_loss
from .base import StepConfig, StepKind, StepResult, register


class TrainConfig(StepConfig):
    kind: str = "train"
    epochs: int = Field(10, ge=1)
    lr: float | None = Field(None, gt=0)           # default: the recipe's optimizer.lr
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    unless_checkpoint: bool = False                 # skip when the model comes with a checkpoint


class DistillConfig(TrainConfig):
    kind: str = "distill"
    teacher: str = "teacher"
    temperature: float = Field(20.0, gt=0)          # the seed's T
    alpha: float = Field(0.5, ge=0, le=1)           # the seed's a
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


def frozen_teacher(ctx, name: str) -> torch.nn.Module:
    """A model of the run in eval mode, without gradients, in the run's memory format."""
    teacher = ctx.speed.prepare(ctx.models[name].build(ctx.device, ctx.recipe.seed).eval())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_loss(ctx, teacher_name: str, temperature: float, alpha: float, cache: str = "auto", label: str = ""):
    """A loss factory for learning from a teacher (distill, and fine-tuning after pruning).

    Without random augmentation the teacher sees the same inputs every epoch: its logits
    are computed once instead of once per batch per epoch (the teacher dominates the cost).
    Otherwise it runs on every augmented batch, in the loop's precision (autocast).
    """
    teacher = frozen_teacher(ctx, teacher_name)
    cached = None
    if cache == "always" or (cache == "auto" and not ctx.pipeline("train").random):
        cached = ctx.logits(teacher, "train", "train")
        ctx.log(f"{label}: teacher logits computed once for {len(cached)} training images")

    def factory(module):
        def loss(logits, y, idx, x):
            if cached is not None:
                t = cached[idx]
            else:
                with torch.no_grad():
                    t = teacher(x)
            return kd_loss(logits, t, y, temperature, alpha)

        return loss

    return factory
