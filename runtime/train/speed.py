"""The recipe's `speed` section resolved for a device: precision, memory format, compilation.

Defaults follow what a tuned PyTorch loop does on each device: on CUDA, bf16 autocast,
channels_last, cuDNN's autotuner (the usual choice when input sizes are fixed, as here), the
decoded images kept on the GPU, and training steps replayed as CUDA graphs (launch-bound at
small batches otherwise); on the CPU, fp32 (bf16 autocast is slower than fp32 on CPUs
without native bf16) and channels_last where oneDNN runs the convolutions (1.03-1.74x faster
training of the shipped specs on an x86 CPU; BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..recipe import SpeedConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Speed:
    device: torch.device
    precision: str               # bf16 | fp16 | fp32
    channels_last: bool
    compile: str                 # off | default | reduce-overhead | max-autotune
    data_on_device: bool | None  # None: when it fits
    background_checkpoints: bool = False  # write each epoch's checkpoint while the next epoch trains
    cudnn_benchmark: bool = False         # cuDNN's autotuner: the input size is fixed, so it times each shape once
    cuda_graphs: bool = False             # replay whole training steps (runtime.train.trainstep)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def autocast(self):
        """Mixed precision for forward passes (and the loss); a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self):
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        if self.precision == "fp16":
            return torch.amp.GradScaler(self.device.type)
        return None

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module in the memory format to train or run it in (in place)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    @contextlib.contextmanager
    def backends(self):
        """Process-wide switches for the length of a run, restored after it (a library must not leave
        them set for its caller)."""
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = before or self.cudnn_benchmark
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before

    def compiled(self, module: torch.nn.Module):
        if self.compile == "off":
            return module
        return torch.compile(module, mode=None if self.compile == "default" else self.compile)

    def describe(self) -> str:
        return (f"{self.device.type}: {self.precision}"
                + (", channels_last" if self.channels_last else "")
                + (f", torch.compile ({self.compile})" if self.compile != "off" else "")
                + (", checkpoints written in the background" if self.background_checkpoints else "")
                + (", cuDNN autotuning" if self.cudnn_benchmark else "")
                + (", training steps replayed as CUDA graphs" if self.cuda_graphs else ""))


def resolve(cfg: SpeedConfig, device: torch.device, ddp: bool = False) -> Speed:
    cuda = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        precision = "fp16"
    if cfg.channels_last == "auto":
        channels_last = cuda or torch.backends.mkldnn.is_available()
    else:
        channels_last = bool(cfg.channels_last)
    on_device = None if cfg.data_on_device == "auto" else bool(cfg.data_on_device)
    # On the CPU the writer would take cores from training; on CUDA the host is otherwise waiting.
    background = cuda if cfg.background_checkpoints == "auto" else bool(cfg.background_checkpoints)
    autotune = cuda if cfg.cudnn_benchmark == "auto" else bool(cfg.cudnn_benchmark)
    # torch.compile's reduce-overhead makes graphs of its own; a replay would skip DDP's gradient buckets
    # and fp16 loss scaling's checks; the CPU has none
    graphs = cuda and cfg.compile == "off" and precision != "fp16" and not ddp and cfg.cuda_graphs in ("auto", True)
    return Speed(device, precision, channels_last, cfg.compile, on_device, background, autotune, graphs)


def plain(device: str | torch.device = "cpu") -> Speed:
    """fp32, contiguous, eager: the reference setting (int8 kernels, latency, tests)."""
    return Speed(torch.device(device), "fp32", False, "off", None)
