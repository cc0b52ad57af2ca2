"""torchrun: one process group per launch, NCCL on CUDA and gloo on the CPU.

A launch by torchrun gets a process group even with one process, so that the collective code paths
(DDP, summed metrics, barriers) are the ones a single GPU exercises too."""
from __future__ import annotations

import ctypes
import os
from collections import deque

import torch

# The works of the last collectives that summed tensors; see `stop`.
_recent_works: deque = deque(maxlen=64)


def launched() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def start(device: torch.device) -> torch.device:
    """Join the launch's process group (if launched so); returns the device this rank uses."""
    by_torchrun = "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ
    if active() or not (by_torchrun or launched()[1] > 1):
        return device
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def sum_over_ranks(*tensors: torch.Tensor) -> None:
    """Sum each tensor in place over the ranks (blocking), keeping the collective's work object; see `stop`."""
    for tensor in tensors:
        work = torch.distributed.all_reduce(tensor, async_op=True)
        work.wait()
        _recent_works.append(work)


def stop() -> None:
    """Leave the process group, and keep the last collectives' works alive until the process is gone.

    gloo's worker thread lets go of a collective's work a moment after the work finished. When it holds the last
    reference, it frees the work's tensors, and that needs the GIL. Once Python has begun to exit, taking the GIL
    ends the thread inside C++, which aborts the process ("terminate called without an active exception", torch
    2.14): a rank whose last collective came just before its exit died so about one run in ten. A kept work is
    never freed, so never by that thread; the works of older collectives were let go of long ago."""
    if active():
        torch.distributed.destroy_process_group()
    for work in _recent_works:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(work))
    _recent_works.clear()
