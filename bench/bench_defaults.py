"""Which training defaults reach good accuracy: `kd_wq` variants on cifar10-mini, one table.

Each variant is the built-in `kd_wq` recipe plus `--set` overrides, run as a fresh CLI process
with `--epochs N` (teacher and student alike). Reported: the teacher's, the distilled
student's and the 8-bit student's best validation accuracy, with the standard error of an
accuracy p measured on n images, sqrt(p (1 - p) / n).

Run: python bench/bench_defaults.py [--epochs 15] [--input 3x32x32] [--per-class N] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"

FLIP_CROP = "transforms.train=[{flip: 0.5}, {crop: {padding: 0.125}}]"
VARIANTS = {
    "none": ["transforms.train=[]"],
    "flip": ["transforms.train=[{flip: 0.5}]"],
    "flip+crop": [FLIP_CROP],
    "flip+crop, lr 1e-3": [FLIP_CROP, "optimizer.lr=0.001"],
    "flip+crop, smoothing 0.1": [FLIP_CROP, "steps.teacher.label_smoothing=0.1", "steps.distill.label_smoothing=0.1"],
    "shipped": [],
}


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--input", default="3x32x32")
    p.add_argument("--per-class", type=int)
    p.add_argument("--only", nargs="+", choices=list(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    for name in args.only or VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "runtime", "specs/student.spec", "--recipe", "kd_wq", "--data", str(DATA),
                   "--epochs", str(args.epochs), "--input", args.input, "--device", args.device, "--out", tmp]
            for s in VARIANTS[name] + ([f"data.limit_per_class={args.per_class}"] if args.per_class else []):
                cmd += ["--set", s]
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-2000:])
                raise SystemExit(f"{name}: exit {proc.returncode}")
            steps = {s["name"]: s for s in json.loads((Path(tmp) / "report.json").read_text())["steps"]}
            n = steps["evaluate"]["metrics"]["images"]
            row = {"variant": name, "input": args.input, "epochs": args.epochs, "val_images": n,
                   "teacher": steps["teacher"]["val_accuracy"], "distilled": steps["distill"]["val_accuracy"],
                   "int8": steps["quantize"]["val_accuracy"], "seconds": time.time() - t0}
            rows.append(row)
            print(f"{name:28s} teacher {row['teacher']:.4f}  distilled {row['distilled']:.4f}  "
                  f"8-bit {row['int8']:.4f} (+-{stderr(row['int8'], n):.4f})  {row['seconds']:.0f} s", flush=True)
    print("\n| variant | input | teacher | distilled student | 8-bit student |\n|---|---|---:|---:|---:|")
    for r in rows:
        se = stderr(r["int8"], r["val_images"])
        print(f"| {r['variant']} | {r['input']} | {r['teacher']:.4f} | {r['distilled']:.4f} | "
              f"{r['int8']:.4f} +- {se:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
