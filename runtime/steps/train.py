"""`train` (cross-entropy) and `distill` (Hinton's loss against a frozen teacher)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from compiler.errors import NcError
from compiler.fileformat import SPEC

from ..quant import fakequant
from ..recipe import Strict
from ..train.loop import fit
from ..train.losses import KD_ALPHA, KD_TEMPERATURE, Temperature
from .base import StepConfig, StepKind, StepResult, register
from .finetune import teacher_loss
from .formats import resolve_format, unmatched_patterns


class QuantizeAware(Strict):
    """Train with every stored tensor rounded as the file of `format` will hold it (runtime.quant.fakequant)."""

    format: str = SPEC                       # a weight format, or `spec`: the spec's precision section
    fallback: str | None = None              # the format for `spec` when the spec has no precision section
    formats: dict[str, str] = {}             # tensor-name pattern -> format, as in `quantize`
    scales: Literal["learned", "minmax"] = "learned"  # learned range ends (LSQ's gradient) or each tensor's min/max
    freeze_bn_epochs: int = Field(1, ge=0)   # the last epochs use (rounded) running statistics, no longer updated

    def weight_format(self, where: str, model=None):
        return resolve_format(where, self.format, model, fallback=self.fallback, formats=self.formats)


class TrainConfig(StepConfig):
    kind: str = "train"
    epochs: int = Field(10, ge=1)
    lr: float | None = Field(None, gt=0)           # default: the recipe's optimizer.lr
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    unless_checkpoint: bool = False                 # skip when the model comes with a checkpoint
    quantize_aware: QuantizeAware | None = None     # quantization-aware training for a following `quantize`


class DistillConfig(TrainConfig):
    kind: str = "distill"
    teacher: str = "teacher"
    temperature: Temperature = KD_TEMPERATURE
    alpha: float = Field(KD_ALPHA, ge=0, le=1)
    teacher_cache: Literal["auto", "always", "never"] = "auto"


def _train(cfg, ctx, key, loss_fn_factory) -> StepResult:
    slot = ctx.models[cfg.model]
    torch.manual_seed(ctx.recipe.seed)
    module = slot.build(ctx.device, ctx.recipe.seed)
    loss_fn = loss_fn_factory(module)
    step_dir = ctx.run.step_dir(cfg.name)
    qat, hook, extra = cfg.quantize_aware, None, {}
    if qat is not None:
        fmt = qat.weight_format(_where(cfg), slot.model)
        count = fakequant.attach(module, slot.model, fmt, qat.scales, fused=ctx.speed.compile == "off")
        first_frozen = max(1, cfg.epochs - qat.freeze_bn_epochs)  # BN statistics need one epoch first

        def hook(epoch, net):
            if epoch >= first_frozen:
                fakequant.freeze_batchnorm(net)

        extra = {"quantize_aware": {"format": fmt.name, "formats": dict(fmt.overrides), "scales": qat.scales,
                                    "tensors": count, "freeze_bn_epochs": qat.freeze_bn_epochs}}
        ctx.log(f"{cfg.name}: quantization-aware: {count} tensors rounded as {fmt.name}"
                + (f" (+ {len(fmt.overrides)} overrides)" if fmt.overrides else "") + f", {qat.scales} ranges")
    metrics = fit(ctx, module=module, step_dir=step_dir, key=key, epochs=cfg.epochs, lr=cfg.lr,
                  loss_fn=loss_fn, label=cfg.name, epoch_hook=hook)
    if qat is not None:
        fakequant.bake(module)  # plain tensors whose min/max codes are the ones training used
    path, size = ctx.save(slot, module, cfg.name)
    return StepResult(model_file=path, metrics={**metrics, **extra}, files=[f"steps/{cfg.name}/curves.png"])


def _where(cfg) -> str:
    return f"{cfg.kind} step `{cfg.name}`: quantize_aware"


def _check_quantize_aware(cfg, models) -> list[str]:
    qat = cfg.quantize_aware
    if qat is None:
        return []
    model = models[cfg.model].model if cfg.model in models else None
    try:
        qat.weight_format(_where(cfg), model)
    except NcError as err:
        return [str(err)]
    problems = []
    if qat.freeze_bn_epochs > cfg.epochs:
        problems.append(f"{_where(cfg)}.freeze_bn_epochs: {qat.freeze_bn_epochs} is more than the step's "
                        f"{cfg.epochs} epoch(s)")
    if model is not None:
        problems += unmatched_patterns(_where(cfg), qat.formats, model)
    return problems


def _qat_note(cfg) -> str:
    q = cfg.quantize_aware
    return "" if q is None else f", quantization-aware at {q.format}" + (f" (else {q.fallback})" if q.fallback else "")


@register
class Train(StepKind):
    kind = "train"
    config = TrainConfig
    trains = True

    def produces(self, cfg):
        return [cfg.model]

    def check(self, cfg, models, listing):
        return _check_quantize_aware(cfg, models)

    def describe(self, cfg):
        return f"train {cfg.model} for {cfg.epochs} epoch(s) with cross-entropy" + _qat_note(cfg)

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
                f"(T={cfg.temperature:g}, alpha={cfg.alpha:g})" + _qat_note(cfg))

    def check(self, cfg, models, listing):
        return _check_quantize_aware(cfg, models)

    def run(self, cfg: DistillConfig, ctx, key: str = "") -> StepResult:
        return _train(cfg, ctx, key, teacher_loss(ctx, cfg.teacher, cfg.temperature, cfg.alpha, cfg.teacher_cache,
                                                  cfg.name))
