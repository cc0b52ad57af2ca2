"""torchrun: one process group per launch, NCCL on CUDA and gloo on the CPU.

A launch by torchrun gets a process group even with one process, so that the collective code paths
(DDP, summed metrics, barriers) are the ones a single GPU exercises too."""
from __future__ import annotations

import os

import torch


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


def stop() -> None:
    if active():
        torch.distributed.destroy_process_group()
