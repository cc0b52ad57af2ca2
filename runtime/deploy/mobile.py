"""ExecuTorch: the model as a `.pte` program for phones and boards, lowered to XNNPACK (its CPU backend).

An optional extra (`pip install -e '.[mobile]'`): PyTorch's own on-device runtime, installed beside
the pinned torch. The program holds the float weights (the model file's, decoded), fixed at batch 1
and the spec's input size, as on-device runtimes run them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from compiler.errors import NcError

EXTRA = "pip install -e '.[mobile]'"


class MobileError(NcError):
    """ExecuTorch is missing or cannot lower the model."""


def available() -> bool:
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        return False
    return True


def export_pte(module: torch.nn.Module, input_shape: tuple, path: Path) -> int:
    """`module` as an ExecuTorch program with every supported op delegated to XNNPACK; returns its bytes."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise MobileError(f"ExecuTorch is not installed; {EXTRA}") from None
    from ..files import atomic_write

    example = (torch.zeros(1, *input_shape),)
    with torch.no_grad():
        exported = torch.export.export(module.eval(), example)
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    atomic_write(path, program.buffer)
    return path.stat().st_size


def pte_runner(path: Path):
    """A function running the program's `forward` on one batch-1 tensor (ExecuTorch's Python runtime)."""
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise MobileError(f"ExecuTorch is not installed; {EXTRA}") from None
    method = Runtime.get().load_program(str(path)).load_method("forward")
    return lambda x: method.execute([x])[0]


def pte_latency_ms(path: Path, input_shape: tuple, runs: int = 100) -> float:
    """Median milliseconds of one batch-1 forward pass of the program, after 3 warm-ups."""
    from .latency import median_ms

    run = pte_runner(path)
    x = torch.rand(1, *input_shape)
    return median_ms(lambda: run(x), runs)
