"""Learning after a change, shared by distill, prune and lowrank: teacher losses and fine-tuning.

Steps use these functions (composition); none inherits another step's code.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..recipe import Strict
from ..train.loop import fit
from ..train.losses import KD_ALPHA, KD_TEMPERATURE, Temperature, kd_loss


class Finetune(Strict):
    """Fine-tuning after an architecture change: cross-entropy (`train`) or from a teacher (`distill`)."""

    kind: Literal["train", "distill"] = "train"
    epochs: int = Field(1, ge=0)
    lr: float | None = Field(None, gt=0)
    teacher: str = "teacher"
    temperature: Temperature = KD_TEMPERATURE
    alpha: float = Field(KD_ALPHA, ge=0, le=1)


def finetune_needs(cfg) -> list[str]:
    """The step's own model, and the teacher when it fine-tunes by distillation."""
    ft = cfg.finetune
    return [cfg.model] + ([ft.teacher] if ft and ft.kind == "distill" else [])


_MISSING = object()


def set_finetune_epochs(config_cls, raw: dict, epochs: int) -> None:
    """`--epochs N` sets the fine-tuning epochs; a step whose fine-tuning is off stays off."""
    finetune_raw = raw.get("finetune", _MISSING)
    if finetune_raw is _MISSING:
        if config_cls.model_fields["finetune"].default is None:
            return
        finetune_raw = {}
    if isinstance(finetune_raw, dict):
        raw["finetune"] = {**finetune_raw, "epochs": epochs}


def frozen_teacher(ctx, name: str) -> torch.nn.Module:
    """A model of the run in eval mode, without gradients, in the run's memory format."""
    teacher = ctx.speed.prepare(ctx.models[name].build(ctx.device, ctx.recipe.seed).eval())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_loss(ctx, teacher_name: str, temperature: float = KD_TEMPERATURE, alpha: float = KD_ALPHA,
                 cache: str = "auto", label: str = ""):
    """A loss factory for learning from a teacher.

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


def finetune_loss(ft: Finetune, ctx):
    if ft.kind == "train":
        return lambda module: (lambda logits, y, idx, x: torch.nn.functional.cross_entropy(logits, y))
    return teacher_loss(ctx, ft.teacher, ft.temperature, ft.alpha, label="fine-tuning")


def finetune(ctx, ft: Finetune, module: torch.nn.Module, step_dir, key: str, label: str,
             loss_factory=None) -> dict:
    """Fine-tune `module` in place (best epoch kept), as the step's `finetune` section says.
    A step that fine-tunes several times passes one `finetune_loss` (its teacher is built once)."""
    loss_factory = loss_factory or finetune_loss(ft, ctx)
    return fit(ctx, module=module, step_dir=step_dir, key=key, epochs=ft.epochs, lr=ft.lr,
               loss_fn=loss_factory(module), label=label)
