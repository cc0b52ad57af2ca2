"""The training loop shared by `train`, `distill` and fine-tuning: epochs, best weights, resume.

Batches are index tensors into the decoded uint8 images, gathered where the model runs
and augmented there as whole batches (runtime.data.transforms). Each step runs eagerly or as a
replayed CUDA graph (runtime.train.trainstep); losses and correct counts accumulate on the device:
one host sync per epoch. After every epoch rank 0 writes a
checkpoint (runtime.train.checkpoints), so an interrupted step continues from its last finished epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from compiler.errors import NcError

from ..data.batches import Placed, epoch_order
from ..data.transforms import Pipeline
from ..weights import state_tensors, unwrap
from . import distributed
from .checkpoints import CheckpointWriter, Progress, resume
from .trainstep import TrainStep

if TYPE_CHECKING:  # typing only: the context calls into this module's callers, not the reverse
    from .context import RunContext

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochHook = Callable[[int, torch.nn.Module], None]  # (epoch, module) after train(), before the epoch's batches


class TrainingError(NcError):
    """Training that cannot go on (a loss that is no longer a number)."""


def make_optimizer(ctx: RunContext, module: torch.nn.Module, lr: float | None):
    cfg = ctx.recipe.optimizer
    lr = lr if lr is not None else cfg.lr
    # one kernel for all parameters, on the CPU too (a student step 1.12x the per-parameter loop there; BENCHMARKS.md)
    fused = {"fused": True} if ctx.device.type in ("cuda", "cpu") else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay, **fused)


def make_schedule(ctx: RunContext, optimizer, epochs: int):
    s = ctx.recipe.schedule

    def factor(epoch: int) -> float:
        if epoch < s.warmup_epochs:
            return (epoch + 1) / (s.warmup_epochs + 1)
        if s.name == "cosine":
            span = max(1, epochs - s.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
        if s.name == "step":
            return s.gamma ** ((epoch - s.warmup_epochs) // s.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- epochs ------------------------------------------------------------------------

def train_epoch(ctx: RunContext, step: TrainStep, placed: Placed, pipeline: Pipeline, epoch: int, bar_label: str,
                epoch_hook: EpochHook | None = None) -> tuple[float, float, int]:
    """One epoch over this rank's batches; returns (summed loss, correct, images) after one sync."""
    speed = ctx.speed
    order = epoch_order(len(placed), ctx.recipe.data.batch_size, seed=ctx.recipe.seed, epoch=epoch, rank=ctx.rank,
                        world=ctx.world, device=placed.images.device, drop_single=True)
    gen = torch.Generator(device=speed.device).manual_seed(ctx.recipe.seed * 1_000_003 + epoch)
    seen = 0
    bar = None
    if ctx.interactive:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc=bar_label, leave=False, unit="batch", mininterval=0.5)
    step.net.train()
    if epoch_hook is not None:
        epoch_hook(epoch, unwrap(step.net))
    step.start_epoch()
    for idx in order:
        x = pipeline(placed.images_at(idx).to(speed.device, non_blocking=True), gen,
                     channels_last=speed.channels_last)
        idx = idx.to(speed.device, non_blocking=True)
        step(x, placed.labels[idx], idx)
        seen += idx.shape[0]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    stats = torch.stack([step.loss_sum.double(), step.correct.double(),
                         torch.tensor(float(seen), dtype=torch.float64, device=speed.device)])
    if distributed.active():
        distributed.sum_over_ranks(stats)
    total_loss, total_correct, total_seen = stats.tolist()  # the epoch's host sync
    return total_loss, total_correct, int(total_seen)


def _all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one host sync): a step can poison the weights while the
    loss it reported was still finite (a single batch at an infinite learning rate)."""
    params = [p.detach() for p in module.parameters()]
    return not params or bool(torch.stack([p.isfinite().all() for p in params]).all())


def fit(ctx: RunContext, *, module: torch.nn.Module, step_dir: Path, key: str, epochs: int, lr: float | None,
        loss_fn: LossFn, label: str, epoch_hook: EpochHook | None = None) -> dict:
    """Train `module` for `epochs`; keeps the best weights by validation accuracy (loaded at the end)."""
    speed = ctx.speed
    speed.prepare(module)
    optimizer = make_optimizer(ctx, module, lr)
    schedule = make_schedule(ctx, optimizer, epochs)
    progress = resume(ctx, module, optimizer, schedule, step_dir, key, label, epochs)
    net = module
    if distributed.active():
        net = torch.nn.parallel.DistributedDataParallel(module)
    step = TrainStep(speed, speed.compiled(net), optimizer, speed.scaler(), loss_fn, graphs=speed.cuda_graphs,
                     log=ctx.log, label=label)
    run = _Fit(ctx, module, step, optimizer, schedule, epochs, label, epoch_hook, progress,
               CheckpointWriter(ctx, step_dir, key, background=speed.background_checkpoints))
    try:
        for epoch in range(progress.start, epochs):
            run.epoch(epoch)
    except BaseException:
        run.writer.finish(raise_error=False)  # the last good checkpoint lands; the first error is the one raised
        raise
    finally:
        step.close()
    run.writer.finish()
    if progress.best_state is not None:
        unwrap(module).load_state_dict(progress.best_state, strict=False)
    if ctx.is_main:
        from ..plots import training_curves

        training_curves(progress.history, step_dir / "curves.png", label)
    ran = progress.history[progress.start:]
    return {"val_accuracy": progress.best_acc, "best_epoch": progress.best_epoch, "epochs": epochs,
            "history": progress.history,
            "images_per_second": sum(h["images_per_second"] for h in ran) / len(ran) if ran else None}


@dataclass
class _Fit:
    """What every epoch of one `fit` shares."""

    ctx: RunContext
    module: torch.nn.Module          # the model itself (weights, checks, checkpoints)
    step: TrainStep                  # trains the module, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    schedule: object
    epochs: int
    label: str
    epoch_hook: EpochHook | None
    progress: Progress
    writer: CheckpointWriter

    def epoch(self, epoch: int) -> None:
        """Train one epoch, validate, keep the best weights, checkpoint; the epoch's line is printed once
        its checkpoint is on disk, so a run killed after that line resumes after this epoch."""
        ctx, progress, label, epochs = self.ctx, self.progress, self.label, self.epochs
        t0 = time.perf_counter()
        loss_sum, correct, seen = train_epoch(ctx, self.step, ctx.placed("train"), ctx.pipeline("train"), epoch,
                                              f"{label} {epoch + 1}/{epochs}", self.epoch_hook)
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(loss_sum) or not _all_finite(self.module):
            what = "training loss" if not math.isfinite(loss_sum) else "weights' values"
            value = loss_sum / max(1, seen) if not math.isfinite(loss_sum) else "NaN or infinite"
            raise TrainingError(
                f"{label}: the {what} became {value} in epoch {epoch + 1} of {epochs}; "
                f"nothing of this epoch was saved\n  hint: the learning rate "
                f"({self.optimizer.param_groups[0]['lr']:g}) is probably too high; lower it, e.g. "
                f"--set optimizer.lr=0.001")
        self.schedule.step()
        val = ctx.evaluate(self.module, "val")
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
               "train_accuracy": correct / max(1, seen), "val_loss": val.loss, "val_accuracy": val.accuracy,
               "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               "images_per_second": seen / train_seconds}
        progress.history.append(row)
        if val.accuracy > progress.best_acc:
            progress.best_acc, progress.best_epoch = val.accuracy, epoch + 1
            progress.best_state = state_tensors(unwrap(self.module), copy=True)
        line = (f"{label} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f} | val loss {val.loss:.4f} acc {val.accuracy:.4f} "
                f"| {row['images_per_second']:.0f} img/s")
        self.writer.save(self.module, self.optimizer, self.schedule, epoch, progress, then=lambda: ctx.log(line))
        if ctx.on_epoch is not None:
            ctx.on_epoch(label, row)
