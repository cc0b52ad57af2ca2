"""The training loop shared by `train` and `distill`: epochs, schedule, best checkpoint, resume.

Batches are index tensors into the decoded uint8 images (DistributedSampler +
BatchSampler, so torchrun shards them); no DataLoader workers are needed because
nothing is decoded here. After every epoch rank 0 writes `last.safetensors`
(model + optimizer state + progress in its metadata) atomically, so an interrupted
step continues from its last finished epoch.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch.utils.data import BatchSampler, DistributedSampler

from .context import RunContext, unwrap
from .data import Split
from .transforms import Pipeline
from .weights import atomic_write, state_tensors

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def batches(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world: int = 1):
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    for idx in BatchSampler(sampler, batch_size, drop_last=False):
        yield torch.as_tensor(idx)


@torch.no_grad()
def logits_of(module: torch.nn.Module, split: Split, pipeline: Pipeline, device, batch_size: int) -> torch.Tensor:
    """Logits for every image of a split, in order (eval mode)."""
    was_training = module.training
    module.eval()
    out = []
    for start in range(0, len(split), batch_size):
        x = pipeline(split.images[start:start + batch_size]).to(device, non_blocking=True)
        out.append(module(x).float().cpu())
    module.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    if len(labels) == 0:
        return 0.0, 0.0
    return (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


def make_optimizer(ctx: RunContext, module: torch.nn.Module, lr: float | None):
    cfg = ctx.recipe.optimizer
    lr = lr if lr is not None else cfg.lr
    if cfg.name == "sgd":
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay)


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


def fit(ctx: RunContext, *, module: torch.nn.Module, step_dir: Path, key: str, epochs: int, lr: float | None,
        loss_fn: LossFn, label: str) -> dict:
    """Train `module` for `epochs`; keeps the best weights by validation accuracy (loaded at the end)."""
    data = ctx.data()
    train, val = data.train, data.val
    train_tf, eval_tf = ctx.pipeline("train"), ctx.pipeline("eval")
    device = ctx.device
    optimizer = make_optimizer(ctx, module, lr)
    schedule = make_schedule(ctx, optimizer, epochs)
    last_path, best_path = step_dir / "last.safetensors", step_dir / "best.safetensors"
    history: list[dict] = []
    start, best_acc, best_epoch = 0, -1.0, -1
    if last_path.exists():
        from safetensors import safe_open

        with safe_open(str(last_path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key and best_path.exists():
            tensors = load_file(last_path)
            unwrap(module).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                                           strict=False)
            _restore_optimizer(optimizer, tensors, meta["optimizer"])
            schedule.load_state_dict(json.loads(meta["schedule"]))
            progress = json.loads(meta["progress"])
            start, best_acc, best_epoch, history = (progress["epoch"] + 1, progress["best_acc"],
                                                    progress["best_epoch"], progress["history"])
            ctx.log(f"{label}: resuming after epoch {start} of {epochs}")
    best_state = load_file(best_path) if start > 0 else None

    net = module
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(module)
    n_train = len(train)
    for epoch in range(start, epochs):
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        seen = 0
        order = list(batches(n_train, ctx.recipe.data.batch_size, shuffle=True, seed=ctx.recipe.seed, epoch=epoch,
                             rank=ctx.rank, world=ctx.world))
        bar = None
        if ctx.interactive:
            from tqdm import tqdm

            bar = tqdm(order, desc=f"{label} {epoch + 1}/{epochs}", leave=False, unit="batch")
        for i, idx in enumerate(bar if bar is not None else order):
            x = train_tf(train.images[idx]).to(device, non_blocking=True)
            y = train.labels[idx].to(device, non_blocking=True)
            logits = net(x)
            loss = loss_fn(logits, y, idx, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += loss.detach().double().cpu() * len(idx)
                correct += (logits.argmax(1) == y).sum().cpu()
            seen += len(idx)
            if bar is not None and i % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
        if bar is not None:
            bar.close()
        stats = torch.tensor([loss_sum.item(), float(correct.item()), float(seen)], dtype=torch.float64)
        if ctx.world > 1:
            torch.distributed.all_reduce(stats)
        train_seconds = time.perf_counter() - t0
        schedule.step()
        val_logits = logits_of(module, val, eval_tf, device, ctx.recipe.data.eval_batch_size)
        val_acc, val_loss = accuracy_and_loss(val_logits, val.labels)
        row = {"epoch": epoch + 1, "train_loss": stats[0].item() / stats[2].item(),
               "train_accuracy": stats[1].item() / stats[2].item(), "val_loss": val_loss, "val_accuracy": val_acc,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               "images_per_second": stats[2].item() / train_seconds}
        history.append(row)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch + 1
            best_state = {k: v.clone() for k, v in state_tensors(unwrap(module)).items()}
        if ctx.is_main:
            opt_tensors, opt_meta = _optimizer_tensors(optimizer)
            model_tensors = {f"model.{k}": v.contiguous() for k, v in state_tensors(unwrap(module)).items()}
            progress = {"epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch, "history": history}
            if best_epoch == epoch + 1:
                atomic_write(best_path, st_save({k: v.contiguous() for k, v in best_state.items()}))
            atomic_write(last_path, st_save({**model_tensors, **opt_tensors},
                                            metadata={"key": key, "optimizer": opt_meta,
                                                      "schedule": json.dumps(schedule.state_dict()),
                                                      "progress": json.dumps(progress)}))
        # Logged after the checkpoint is on disk: a run killed after this line resumes after this epoch.
        ctx.log(f"{label} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
                f"| val loss {val_loss:.4f} acc {val_acc:.4f} | {row['images_per_second']:.0f} img/s")
    if best_state is not None:
        unwrap(module).load_state_dict(best_state, strict=False)
    if ctx.is_main:
        from .plots import training_curves

        training_curves(history, step_dir / "curves.png", label)
    return {"val_accuracy": best_acc, "best_epoch": best_epoch, "epochs": epochs, "history": history,
            "images_per_second": (sum(h["images_per_second"] for h in history[start:]) / max(1, len(history[start:]))
                                  if history[start:] else None)}
