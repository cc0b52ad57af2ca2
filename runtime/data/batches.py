"""Batches of decoded images where the model runs.

A split's uint8 images go to the GPU once when they fit (half the free memory at most);
otherwise they stay in host memory (or a memory-mapped cache file) and each batch is
gathered into pinned memory and copied asynchronously. Labels always go to the device.
Batch order is a tensor (no Python loop over samples): the same permutation that
DistributedSampler draws, sharded over ranks.
"""
from __future__ import annotations

import torch

from . import Split


class Placed:
    """A split's images and labels, placed for one device."""

    def __init__(self, split: Split, device: torch.device, on_device: bool | None = None):
        self.split, self.device = split, device
        cuda = device.type == "cuda"
        if on_device is None:
            on_device = cuda and _fits(split.images, device)
        self.on_device = bool(cuda and on_device)
        self.images = split.images.to(device) if self.on_device else split.images
        self.labels = split.labels.to(device) if split.labels is not None else None
        self._pinned: list[torch.Tensor] = []
        self._events: list = []
        self._turn = 0

    def __len__(self) -> int:
        return len(self.split)

    @property
    def where(self) -> str:
        if self.device.type != "cuda":
            return "host memory"
        return "GPU memory" if self.on_device else "pinned host memory, copied per batch"

    def images_at(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images of the batch `idx` on the device."""
        if self.on_device or self.device.type != "cuda":
            return self.images.index_select(0, idx.to(self.images.device))
        return self._copy(idx.cpu())

    def range(self, start: int, stop: int) -> torch.Tensor:
        if self.on_device or self.device.type != "cuda":
            return self.images[start:stop]
        return self._copy(torch.arange(start, stop))

    def _copy(self, idx: torch.Tensor) -> torch.Tensor:
        # Two pinned buffers used in turn; before refilling one, wait only for its own copy.
        shape = (len(idx), *self.images.shape[1:])
        size = idx.numel() * self.images[0].numel()
        if len(self._pinned) < 2:
            self._pinned.append(torch.empty((0,), dtype=torch.uint8).pin_memory())
            self._events.append(None)
        k = self._turn % 2
        self._turn += 1
        if self._events[k] is not None:
            self._events[k].synchronize()
        if self._pinned[k].numel() < size:
            self._pinned[k] = torch.empty((size,), dtype=torch.uint8).pin_memory()
        buf = self._pinned[k][:size].view(shape)
        torch.index_select(self.images, 0, idx, out=buf)
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[k] = event
        return out


def _fits(images: torch.Tensor, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= free // 2


def epoch_order(n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                shuffle: bool = True, device: torch.device | None = None,
                drop_single: bool = False) -> list[torch.Tensor]:
    """This rank's batches of indices for one epoch, as DistributedSampler + BatchSampler give them.

    `drop_single` leaves out a last batch of one sample (BatchNorm cannot train on it).
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world > 1:  # pad by repeating the start, then every world-th index (DistributedSampler)
        total = -(-n // world) * world
        if total > n:
            order = torch.cat([order, order[: total - n].repeat(-(-(total - n) // max(1, n)))[: total - n]])
        order = order[rank:total:world]
    if device is not None:
        order = order.to(device)
    out = list(torch.split(order, batch_size))
    if drop_single and out and len(out[-1]) == 1 and len(out) > 1:
        out.pop()
    return out
