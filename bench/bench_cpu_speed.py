"""Training throughput on the CPU per precision and memory format: the evidence for `speed`'s CPU
defaults (runtime/train/speed.py). A plain loop (uint8 images in memory, AdamW, cross-entropy) trains each
shipped spec in fp32 or bf16 autocast, with contiguous or channels_last tensors; img/s is the median
of epochs 2..E, so one-time costs (oneDNN's kernel choice) are left out.

Run: python bench/bench_cpu_speed.py [--specs student:32 teacher:32 ...] [--batch 64] [--epochs 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402

SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def throughput(model, size: int, precision: str, channels_last: bool, batch: int, images: int, epochs: int) -> float:
    torch.manual_seed(0)
    module = compiler.build_module(model, seed=0).train()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    x_all = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8)
    y_all = torch.randint(0, 10, (images,))
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for idx in torch.split(torch.randperm(images), batch):
            x = x_all[idx].float().div_(255)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(module(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(images / (time.perf_counter() - t0))
    return statistics.median(rates[1:] or rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=["student:32", "student:64", "student_se:32", "teacher:32",
                                                    "origin:256"], help="SPEC:SIZE (square input)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=1024, help="per epoch; a quarter of it at sizes over 128")
    args = p.parse_args()
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text()] \
        if Path("/proc/cpuinfo").exists() else []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN "
          f"{'on' if torch.backends.mkldnn.is_available() else 'off'}, native bf16: {', '.join(flags) or 'no'}; "
          f"batch {args.batch}")
    print("\n| spec | input | fp32 contiguous | fp32 channels_last | bf16 contiguous | bf16 channels_last |"
          "\n|---|---|---:|---:|---:|---:|")
    for item in args.specs:
        name, size = item.split(":")
        size = int(size)
        model = compiler.compile_spec(ROOT / "specs" / f"{name}.spec", params={"classes": 10},
                                      input_shape=(3, size, size))
        images = args.images if size <= 128 else args.images // 4
        rates = [throughput(model, size, prec, cl, args.batch, images, args.epochs) for prec, cl in SETTINGS]
        base = rates[0]
        print(f"| {name} | {size}x{size} | " + " | ".join(f"{r:,.0f} ({r / base:.2f}x)" for r in rates) + " |",
              flush=True)


if __name__ == "__main__":
    main()
