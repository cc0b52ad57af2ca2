"""How long the budget check takes, against the plain PyTorch way.

Compares, each as a fresh process (what a user waits for), median of N runs:
  nccompile      `nccompile specs/resnet18.spec --json` (analysis without torch)
  import torch   `python -c "import torch"` alone
  torch summary  build torchvision's resnet18(num_classes=11), count parameters and
                 take every layer's output shape and the MACs with one forward pass
                 (forward hooks + torch.utils.flop_counter), as torchsummary users do

Run: python bench/bench_compile.py [--runs 7]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TORCH_SUMMARY = """
import torch, torchvision
from torch.utils.flop_counter import FlopCounterMode
m = torchvision.models.resnet18(num_classes=11).eval()
shapes = {}
for n, mod in m.named_modules():
    mod.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
c = FlopCounterMode(display=False)
with torch.no_grad(), c:
    m(torch.randn(1, 3, 224, 224))
print(sum(p.numel() for p in m.parameters()), c.get_total_flops() // 2, len(shapes))
"""


def timed(cmd: list[str], runs: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{cmd} failed: {proc.stderr}")
        out = proc.stdout
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    py = sys.executable
    cases = {
        "nccompile specs/resnet18.spec --json": [py, "-m", "runtime", "specs/resnet18.spec", "--json"],
        'python -c "import torch"': [py, "-c", "import torch"],
        "torch: build resnet18 + forward summary": [py, "-c", TORCH_SUMMARY],
    }
    results = {name: timed(cmd, args.runs) for name, cmd in cases.items()}
    base = results['python -c "import torch"'][0]
    print(f"median of {args.runs} runs, fresh process each, {sys.platform}, python {sys.version.split()[0]}")
    print(f"{'what':45} {'seconds':>8} {'vs import torch':>16}")
    for name, (seconds, _) in results.items():
        print(f"{name:45} {seconds:8.3f} {seconds / base:15.2f}x")
    import json

    ours = json.loads(results["nccompile specs/resnet18.spec --json"][1])
    params, macs, _ = results["torch: build resnet18 + forward summary"][1].split()
    print(f"same numbers: params {ours['params']} vs {params}, MACs {ours['macs']} vs {macs}")


if __name__ == "__main__":
    main()
