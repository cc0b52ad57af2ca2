"""Below 8 bits on cifar10-mini: file bytes against validation accuracy for round-to-nearest,
calibrated rounding (GPTQ), quantization-aware distillation (QAT) and auto mixed precision.

One teacher checkpoint is shared by every run, and every student trains for the same epochs:
- `float`: `kd` distils the fp32 student; post-training rows quantize that one file
  (`quantize` steps with `rounding: nearest | calibrated`, `format: auto` with `max_bytes`);
- `qat`: `kd_qat` distils the student quantization-aware at 4 bits per tensor (≤ 150,000 bytes);
- `qat auto`: `kd_qat` on the spec `format: auto` wrote for the moonshot budget (≤ 100,000 bytes);
- `qat 4bit`: `kd_qat` on specs/student_4bit.spec, wider than the report's student, ≤ 150,000 bytes;
- `qat wide`: the same spec at base 25 (2.4x the parameters), ≤ 300,000 bytes, against the report's
  8-bit student.
Accuracy is on the 2,000 validation images; one standard error is sqrt(p(1-p)/2000) (~1.1 points).
Run directories persist under --out: a second call reuses every finished run.

Run: python bench/bench_lowbit.py --teacher TEACHER.safetensors [--epochs 15] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.run.runner import Options, run  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"
STUDENT = str(ROOT / "specs/student.spec")
FOUR_BIT = str(ROOT / "specs/student_4bit.spec")
PTQ = [("int8", "nearest", None), ("int6", "nearest", None),
       ("int4", "nearest", None), ("int4", "calibrated", None),
       ("int4-channel", "nearest", None), ("int4-channel", "calibrated", None),
       ("int3-channel", "nearest", None), ("int3-channel", "calibrated", None),
       ("auto", "nearest", 150_000), ("auto", "calibrated", 150_000),
       ("auto", "nearest", 100_000), ("auto", "calibrated", 100_000)]


def steps_of(out: Path) -> dict:
    return {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}


def launch(spec: str, recipe: str, out: Path, sets: list[str], params: dict | None = None) -> dict:
    if not (out / "report.json").exists():
        run(Options(spec, recipe, data=str(DATA), out=str(out), sets=tuple(sets), params=params))
    return steps_of(out)


def se(p: float, n: int = 2000) -> float:
    return math.sqrt(p * (1 - p) / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True, help="teacher weights (e.g. from `nccompile specs/teacher.spec "
                                                     "--recipe scratch`)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default="bench_lowbit_runs")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ptq", "qat", "qat_auto", "qat_4bit", "qat_wide"])
    args = ap.parse_args()
    out = Path(args.out).resolve()
    common = [f"models.teacher.checkpoint={Path(args.teacher).resolve()}", "steps.export.onnx=false"]
    rows = []

    fl = launch(STUDENT, "kd", out / "float", [f"models.teacher.checkpoint={Path(args.teacher).resolve()}",
                                                f"steps.distill.epochs={args.epochs}"])
    fp32 = fl["distill"]["val_accuracy"]
    student_file = out / "float" / fl["distill"]["model_file"]
    rows.append(("fp32 (distilled)", "fp32", fl["distill"]["file_bytes"], fp32))
    if "ptq" not in args.skip:
        for fmt, rounding, budget in PTQ:
            name = f"ptq_{fmt}_{rounding}" + (f"_{budget}" if budget else "")
            recipe = out / f"{name}.yaml"
            step = {"name": "q", "kind": "quantize", "model": "s", "format": fmt, "rounding": rounding}
            if budget:
                step["max_bytes"] = budget
            recipe.write_text(json.dumps({"name": name, "input": "3x32x32", "seed": 0,
                                          "models": {"s": {"spec": STUDENT, "checkpoint": str(student_file)}},
                                          "steps": [step]}))
            q = launch(STUDENT, str(recipe), out / name, [])["q"]
            label = f"{rounding} rounding" + (f", auto for {budget:,}" if budget else "")
            auto = q["metrics"].get("auto", {})
            chosen = auto.get("bits_per_value", auto.get("mean_bits"))
            rows.append((label, fmt if chosen is None else f"auto mix, {chosen:.1f} bits per value", q["file_bytes"],
                         q["val_accuracy"]))
    qat_sets = common + [f"steps.distill.epochs={args.epochs}"]
    if "qat" not in args.skip:
        q = launch(STUDENT, "kd_qat", out / "qat_int4", qat_sets)
        rows.append(("QAT (kd_qat)", q["quantize"]["metrics"]["format"], q["quantize"]["file_bytes"],
                     q["quantize"]["val_accuracy"]))
    if "qat_auto" not in args.skip:
        spec = out / "ptq_auto_nearest_100000" / "steps/q/precision.spec"
        if spec.exists():
            q = launch(str(spec), "kd_qat", out / "qat_auto_100000", qat_sets)
            rows.append(("QAT at auto's precision for 100,000", "mixed", q["quantize"]["file_bytes"],
                         q["quantize"]["val_accuracy"]))
    if "qat_4bit" not in args.skip:
        q = launch(FOUR_BIT, "kd_qat", out / "qat_4bit_base17", qat_sets)
        rows.append(("QAT, specs/student_4bit.spec (base 17, 1.12x params)", "int4 + one int3 layer",
                     q["quantize"]["file_bytes"], q["quantize"]["val_accuracy"]))
    if "qat_wide" not in args.skip:
        q = launch(FOUR_BIT, "kd_qat", out / "qat_wide_base25", qat_sets, params={"base": "25", "limit": "300000"})
        rows.append(("QAT, specs/student_4bit.spec at base 25 (2.4x params)", "int4 + one int3 layer",
                     q["quantize"]["file_bytes"], q["quantize"]["val_accuracy"]))

    print(f"cifar10-mini, 10,000 train / 2,000 val at 32x32; shared teacher {args.teacher}; {args.epochs} epochs "
          f"of distillation per student")
    print("| method | format | file bytes | val accuracy ± 1 SE | vs fp32 |")
    print("|---|---|---:|---:|---:|")
    for label, fmt, size, acc in rows:
        print(f"| {label} | {fmt} | {size:,} | {acc:.4f} ± {se(acc):.4f} | {100 * (acc - fp32):+.2f} pt |")


if __name__ == "__main__":
    main()
