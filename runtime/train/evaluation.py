"""Logits and scores of a model on a split of the data, on the run's device and precision.

Scores accumulate on the device (a confusion matrix and a loss sum) and are read once;
under torchrun each rank scores its share of the images and the counts are summed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batches import Placed
from ..data.transforms import Pipeline
from . import distributed
from .speed import Speed, plain


@dataclass
class Scores:
    accuracy: float
    loss: float
    confusion: torch.Tensor   # [classes, classes] counts, rows = true class
    images: int


@torch.no_grad()
def logits_of(module: torch.nn.Module, placed: Placed, pipeline: Pipeline, speed: Speed, batch_size: int,
              start: int = 0, stop: int | None = None) -> torch.Tensor:
    """float32 logits (on the device) for images start..stop of a placed split, in order, in eval mode."""
    was_training = module.training
    module.eval()
    stop = len(placed) if stop is None else stop
    out = []
    for s in range(start, stop, batch_size):
        x = pipeline(placed.range(s, min(stop, s + batch_size)).to(speed.device, non_blocking=True),
                     channels_last=speed.channels_last)
        with speed.autocast():
            out.append(module(x).float())
    module.train(was_training)
    return torch.cat(out) if out else torch.empty((0, 0), device=speed.device)


@torch.no_grad()
def score(module: torch.nn.Module, placed: Placed, pipeline: Pipeline, speed: Speed, batch_size: int,
          n_classes: int, rank: int = 0, world: int = 1) -> Scores:
    """Accuracy, mean cross-entropy and confusion matrix; each rank scores its share, results are summed."""
    n = len(placed)
    lo, hi = n * rank // world, n * (rank + 1) // world
    conf = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=speed.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=speed.device)
    if hi > lo:
        logits = logits_of(module, placed, pipeline, speed, batch_size, lo, hi)
        y = placed.labels[lo:hi]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        conf += torch.bincount(y * n_classes + logits.argmax(1), minlength=n_classes * n_classes)
    if distributed.active():
        distributed.sum_over_ranks(conf, loss_sum)
    matrix = conf.view(n_classes, n_classes).cpu()  # the one host sync
    total = int(matrix.sum())
    if total == 0:
        return Scores(0.0, 0.0, matrix, 0)
    return Scores(matrix.diag().sum().item() / total, loss_sum.item() / total, matrix, total)


def score_split(module: torch.nn.Module, split, pipeline: Pipeline, n_classes: int, speed: Speed | None = None,
                batch_size: int = 256) -> Scores:
    """`score` for a data split outside a run (benchmarks, tests); plain fp32 on the CPU by default."""
    speed = speed or plain()
    return score(module, Placed(split, speed.device), pipeline, speed, batch_size, n_classes)
