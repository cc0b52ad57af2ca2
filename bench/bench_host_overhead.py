"""Host overhead per training step: nccompile's `train` step against a plain loop where the model's
arithmetic is too small to matter (the student at 16x16, batch 4, one thread), so the time is the
Python and dispatch work around each step, which a GPU at small batches waits on as well.
Both sides: fp32, contiguous, AdamW, cross-entropy, the same module and images; median img/s of
epochs 2..E; nccompile and the plain loop alternate --repeats times.

Run: python bench/bench_host_overhead.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from runtime.run.runner import Options, run  # noqa: E402

SIZE, BATCH, EPOCHS, PER_CLASS = 16, 4, 4, 60
RECIPE = f"""
name: host
data: {{batch_size: {BATCH}, limit_per_class: {PER_CLASS}}}
transforms: {{train: [], eval: []}}
speed: {{precision: fp32, channels_last: false}}
steps:
  - {{name: step, kind: train, model: student, epochs: {EPOCHS}}}
"""


def nccompile_rate(tmp: Path, data: Path, n: int) -> float:
    out = tmp / f"run{n}"
    run(Options(str(ROOT / "specs/student.spec"), str(tmp / "r.yaml"), data=str(data), out=str(out), device="cpu",
                input=(3, SIZE, SIZE)))
    from safetensors import safe_open

    with safe_open(str(out / "steps/step/last.safetensors"), framework="pt") as f:
        history = json.loads(f.metadata()["progress"])["history"]
    return statistics.median(h["images_per_second"] for h in history[1:])


def plain_rate(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    module = compiler.build_module(model, seed=0).train()
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=5e-4)
    rates = []
    for _ in range(EPOCHS):
        t0 = time.perf_counter()
        for idx in torch.split(torch.randperm(len(images)), BATCH):
            x, y = images[idx].float().div_(255), labels[idx]
            loss = F.cross_entropy(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(images) / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-mini")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = compiler.compile_spec(ROOT / "specs/student.spec", params={"classes": 10}, input_shape=(3, SIZE, SIZE))
    n = 10 * PER_CLASS
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "r.yaml").write_text(RECIPE)
        for r in range(args.repeats):
            pair = [plain_rate(model, images, labels), nccompile_rate(tmp, args.data, r)] if r % 2 == 0 else \
                list(reversed([nccompile_rate(tmp, args.data, r), plain_rate(model, images, labels)]))
            ratios.append(pair[1] / pair[0])
            print(f"repeat {r + 1}: plain {pair[0]:,.0f} img/s, nccompile {pair[1]:,.0f} img/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"nccompile / plain at batch {BATCH}, {SIZE}x{SIZE}, 1 thread: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
