"""How long an epoch's checkpoint holds up training: inline (serialize, write, fsync) against
background (host copies only; the thread writes while the next epoch trains). On a GPU that time is
the GPU's idle time between epochs. ResNet18 (specs/teacher.spec) with AdamW's state by default.

A background write must also leave the training thread its Python time (the GIL), or the GPU
starves for kernel launches while the file is written: "training thread keeps" is how many
iterations of a Python loop the main thread ran during the write, as a fraction of the same loop
with no write going on.

Run: python bench/bench_checkpoint.py [--spec teacher] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from runtime.train.checkpoints import CheckpointWriter, Progress  # noqa: E402


def _spin(seconds: float) -> int:
    """Iterations of a pure-Python loop in `seconds` (stands in for the training loop's kernel launches)."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="teacher")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = compiler.compile_spec(ROOT / "specs" / f"{args.spec}.spec", params={"classes": 10},
                                  input_shape=(3, 32, 32))
    module = compiler.build_module(model).to(args.device).train()
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 3, 32, 32, device=args.device)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    size += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    print(f"{args.spec} on {args.device}: {size / 1e6:.0f} MB of model and optimizer state per checkpoint")
    for background in (False, True):
        blocked, total, kept = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            writer = CheckpointWriter(SimpleNamespace(is_main=True), Path(tmp), "key", background)
            for epoch in range(args.repeats):
                progress = Progress(best_acc=0.5, best_epoch=epoch + 1, history=[],
                                    best_state={k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
                alone = _spin(0.2) / 0.2  # the loop's rate with no write going on, just before this one
                t0 = time.perf_counter()
                writer.save(module, optimizer, schedule, epoch, progress, then=lambda: None)
                t1 = time.perf_counter()
                if background:
                    spin_start = time.perf_counter()
                    spun = _spin(0.05)
                    while writer.writing:
                        spun += _spin(0.05)
                    kept.append(spun / (time.perf_counter() - spin_start) / alone)
                writer.finish()
                blocked.append(t1 - t0)
                total.append(time.perf_counter() - t0)
        kept_note = f"; training thread keeps {statistics.median(kept):.0%} of its Python time" if kept else ""
        print(f"{'background' if background else 'inline':10s}: training held up {statistics.median(blocked):.3f} s "
              f"per epoch (writing takes {statistics.median(total):.3f} s){kept_note}")


if __name__ == "__main__":
    main()
