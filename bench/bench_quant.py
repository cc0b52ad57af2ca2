"""Bytes and accuracy of every weight format after one shared KD run, and int8 CPU latency.

One `kd_wq` run on cifar10-mini (ResNet18 teacher, distilled student, 8-bit quantize
step with PyTorch's integer kernels), then the distilled fp32 student is written in
every format; for each: predicted bytes, file bytes, validation accuracy of the
dequantized model.

Run: python bench/bench_quant.py [--per-class 500] [--teacher-epochs 3] [--epochs 10]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from compiler.fileformat import parse_format  # noqa: E402
from runtime.data import list_source, load  # noqa: E402
from runtime.data.transforms import Pipeline  # noqa: E402
from runtime.recipe import DataConfig  # noqa: E402
from runtime.run.runner import Options, run  # noqa: E402
from runtime.train.evaluation import score_split  # noqa: E402
from runtime.weights import ModelFile, save_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"
FORMATS = [("fp32", {}), ("fp16", {}), ("int8", {}), ("int8-channel", {}), ("int8", {"fold_bn": True}),
           ("int8-channel", {"fold_bn": True}), ("int6", {}), ("int4", {}), ("int4-channel", {}),
           ("int4-channel", {"keep": ("*.bias", "*running_*", "*.1.weight")}), ("int3", {}), ("int2", {}),
           ("int2-channel", {})]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run(Options(str(ROOT / "specs/student.spec"), "kd_wq", data=str(DATA), out=str(out),
                    sets=(f"data.limit_per_class={args.per_class}", f"steps.teacher.epochs={args.teacher_epochs}",
                          f"steps.distill.epochs={args.epochs}", "steps.export.onnx=false")))
        report = {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}
        quant = report["quantize"]["metrics"]
        student = compiler.compile_spec(ROOT / "specs/student.spec", params={"classes": 10}, input_shape=(3, 32, 32))
        module = ModelFile(out / "steps/distill/model.safetensors").build(student)
        cfg = DataConfig(path=str(DATA), limit_per_class=args.per_class)
        data = load(list_source(cfg), cfg, (3, 32, 32), 0)
        rows = []
        for name, options in FORMATS:
            fmt = parse_format(name, **options)
            path = Path(tmp) / "m.safetensors"
            written = save_model(module, student, path, fmt)
            acc = score_split(ModelFile(path).build(student), data.val, Pipeline([], "eval", 3, (32, 32)),
                              10).accuracy
            label = name + "".join(f" +{k}" if v is True else f" {k}={list(v)}" for k, v in options.items())
            rows.append((label, compiler.predicted_bytes(student, fmt), written, acc))
    print(f"cifar10-mini: {len(data.train)} train / {len(data.val)} val images at 32x32; teacher ResNet18 "
          f"{args.teacher_epochs} epochs (val {report['teacher']['val_accuracy']:.4f}), student distilled "
          f"{args.epochs} epochs")
    fp32_acc = rows[0][3]
    print(f"{'format':45} {'predicted':>10} {'file':>10} {'val acc':>8} {'vs fp32':>8}")
    for label, predicted, written, acc in rows:
        print(f"{label:45} {predicted:10,} {written:10,} {acc:8.4f} {100 * (acc - fp32_acc):+7.2f}pt")
    integer = quant["integer"]
    print(f"int8 kernels ({integer['engine']}): val accuracy {integer['val_accuracy']:.4f}; latency batch 1: "
          f"fp32 {integer['latency_ms_batch1']['fp32']:.2f} ms, int8 {integer['latency_ms_batch1']['int8']:.2f} ms; "
          f"batch 64: fp32 {integer['latency_ms_batch64']['fp32']:.1f} ms, "
          f"int8 {integer['latency_ms_batch64']['int8']:.1f} ms;"
          f" float layers: {integer['float_layers'] or 'none'}")


if __name__ == "__main__":
    main()
