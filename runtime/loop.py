"""The training loop shared by `train`, `distill` and fine-tuning: epochs, best checkpoint, resume.

Batches are index tensors into the decoded uint8 images, gathered where the model runs
and augmented there as whole batches (runtime.transforms). Losses and correct counts
accumulate on the device: one host sync per epoch. After every epoch rank 0 writes
`last.safetensors` (model + optimizer state + progress in its metadata) atomically, so an
interrupted step continues from its last finished epoch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from compiler.errors import NcError

from . import distributed
from .batches import Placed, epoch_order
from .transforms import Pipeline
from .weights import atomic_write, state_tensors, unwrap

if TYPE_CHECKING:  # typing only: the context calls into this module's callers, not the reverse
    from .context import RunContext

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochHook = Callable[[int, torch.nn.Module], None]  # (epoch, module) after train(), before the epoch's batches


class TrainingError(NcError):
    """Training that cannot go on (a loss that is no longer a number)."""


def make_optimizer(ctx: RunContext, module: torch.nn.Module, lr: float | None):
    cfg = ctx.recipe.optimizer
    lr = lr if lr is not None else cfg.lr
    fused = {"fused": True} if ctx.device.type == "cuda" else {}
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


# --- checkpoints ---------------------------------------------------------------------

def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: str) -> None:
    info = json.loads(meta)
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


@dataclass
class Progress:
    start: int = 0                 # first epoch still to run
    best_acc: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)
    best_state: dict | None = None


def resume(ctx: RunContext, module, optimizer, schedule, step_dir: Path, key: str, label: str,
           epochs: int) -> Progress:
    """Progress from `last.safetensors` when it belongs to this very step (same key). Everything is
    read and parsed before anything is applied, so a damaged checkpoint leaves a fresh start."""
    last_path, best_path = step_dir / "last.safetensors", step_dir / "best.safetensors"
    if not last_path.exists() or not best_path.exists():
        return Progress()
    from safetensors import safe_open

    try:
        with safe_open(str(last_path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return Progress()
        tensors = load_file(last_path)
        p = json.loads(meta["progress"])
        progress = Progress(p["epoch"] + 1, p["best_acc"], p["best_epoch"], p["history"], load_file(best_path))
        optimizer_meta, schedule_state = meta["optimizer"], json.loads(meta["schedule"])
    except Exception as err:  # a damaged checkpoint costs its epochs, never the run
        ctx.log(f"{label}: cannot resume from {last_path} ({type(err).__name__}: {str(err)[:200]}); "
                "starting this step over")
        return Progress()
    unwrap(module).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    _restore_optimizer(optimizer, tensors, optimizer_meta)
    schedule.load_state_dict(schedule_state)
    ctx.log(f"{label}: resuming after epoch {progress.start} of {epochs}")
    return progress


def checkpoint(ctx: RunContext, module, optimizer, schedule, step_dir: Path, key: str, epoch: int,
               progress: Progress) -> None:
    if not ctx.is_main:
        return
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    model_tensors = {f"model.{k}": v.contiguous() for k, v in state_tensors(unwrap(module)).items()}
    meta = {"epoch": epoch, "best_acc": progress.best_acc, "best_epoch": progress.best_epoch,
            "history": progress.history}
    if progress.best_epoch == epoch + 1:
        atomic_write(step_dir / "best.safetensors",
                     st_save({k: v.contiguous() for k, v in progress.best_state.items()}))
    atomic_write(step_dir / "last.safetensors", st_save({**model_tensors, **opt_tensors}, metadata={
        "key": key, "optimizer": opt_meta, "schedule": json.dumps(schedule.state_dict()),
        "progress": json.dumps(meta)}))


# --- epochs ------------------------------------------------------------------------

def train_epoch(ctx: RunContext, net, optimizer, scaler, loss_fn: LossFn, placed: Placed, pipeline: Pipeline,
                epoch: int, bar_label: str, epoch_hook: EpochHook | None = None) -> tuple[float, float, int]:
    """One epoch over this rank's batches; returns (summed loss, correct, images) after one sync."""
    speed = ctx.speed
    order = epoch_order(len(placed), ctx.recipe.data.batch_size, seed=ctx.recipe.seed, epoch=epoch, rank=ctx.rank,
                        world=ctx.world, device=placed.images.device, drop_single=True)
    gen = torch.Generator(device=speed.device).manual_seed(ctx.recipe.seed * 1_000_003 + epoch)
    loss_sum = torch.zeros((), dtype=torch.float32, device=speed.device)
    correct = torch.zeros((), dtype=torch.int64, device=speed.device)
    seen = 0
    bar = None
    if ctx.interactive:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc=bar_label, leave=False, unit="batch", mininterval=0.5)
    net.train()
    if epoch_hook is not None:
        epoch_hook(epoch, unwrap(net))
    for idx in order:
        x = pipeline(placed.images_at(idx).to(speed.device, non_blocking=True), gen,
                     channels_last=speed.channels_last)
        idx = idx.to(speed.device, non_blocking=True)
        y = placed.labels[idx]
        with speed.autocast():
            logits = net(x)
            loss = loss_fn(logits, y, idx, x)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().float() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    stats = torch.stack([loss_sum.double(), correct.double(),
                         torch.tensor(float(seen), dtype=torch.float64, device=speed.device)])
    if distributed.active():
        torch.distributed.all_reduce(stats)
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
    placed, pipeline = ctx.placed("train"), ctx.pipeline("train")
    speed = ctx.speed
    speed.prepare(module)
    optimizer = make_optimizer(ctx, module, lr)
    schedule = make_schedule(ctx, optimizer, epochs)
    progress = resume(ctx, module, optimizer, schedule, step_dir, key, label, epochs)
    net = module
    if distributed.active():
        net = torch.nn.parallel.DistributedDataParallel(module)
    net = speed.compiled(net)
    scaler = speed.scaler()
    for epoch in range(progress.start, epochs):
        t0 = time.perf_counter()
        loss_sum, correct, seen = train_epoch(ctx, net, optimizer, scaler, loss_fn, placed, pipeline, epoch,
                                              f"{label} {epoch + 1}/{epochs}", epoch_hook)
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(loss_sum) or not _all_finite(module):
            what = "training loss" if not math.isfinite(loss_sum) else "weights' values"
            value = loss_sum / max(1, seen) if not math.isfinite(loss_sum) else "NaN or infinite"
            raise TrainingError(
                f"{label}: the {what} became {value} in epoch {epoch + 1} of {epochs}; "
                f"nothing of this epoch was saved\n  hint: the learning rate "
                f"({optimizer.param_groups[0]['lr']:g}) is probably too high; lower it, e.g. "
                f"--set optimizer.lr=0.001")
        schedule.step()
        val = ctx.evaluate(module, "val")
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
               "train_accuracy": correct / max(1, seen), "val_loss": val.loss, "val_accuracy": val.accuracy,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               "images_per_second": seen / train_seconds}
        progress.history.append(row)
        if val.accuracy > progress.best_acc:
            progress.best_acc, progress.best_epoch = val.accuracy, epoch + 1
            progress.best_state = {k: v.clone() for k, v in state_tensors(unwrap(module)).items()}
        checkpoint(ctx, module, optimizer, schedule, step_dir, key, epoch, progress)
        # Logged after the checkpoint is on disk: a run killed after this line resumes after this epoch.
        ctx.log(f"{label} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
                f"| val loss {val.loss:.4f} acc {val.accuracy:.4f} | {row['images_per_second']:.0f} img/s")
        if ctx.on_epoch is not None:
            ctx.on_epoch(label, row)
    if progress.best_state is not None:
        unwrap(module).load_state_dict(progress.best_state, strict=False)
    if ctx.is_main:
        from .plots import training_curves

        training_curves(progress.history, step_dir / "curves.png", label)
    ran = progress.history[progress.start:]
    return {"val_accuracy": progress.best_acc, "best_epoch": progress.best_epoch, "epochs": epochs,
            "history": progress.history,
            "images_per_second": sum(h["images_per_second"] for h in ran) / len(ran) if ran else None}
