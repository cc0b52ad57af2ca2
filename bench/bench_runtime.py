"""Throughput of nccompile's `train` and `distill` steps against a plain PyTorch loop.

The plain loop is the course's kind: torchvision ImageFolder (PIL decode + ToTensor on
every access), a DataLoader, the same student module, batch size, optimizer, epochs
and data; validation after every epoch as nccompile does. Both sides run in this one
process, one after the other, on the same subset of cifar10-mini.

Measured: images per second = epochs * training images / wall time of the whole step
(so nccompile's one-time decoding and its one-time teacher logits are counted), and
the final validation accuracy of each.

Run: python bench/bench_runtime.py [--per-class 300] [--epochs 5] [--teacher-epochs 3] [--workers 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from runtime.run.runner import Options, run  # noqa: E402
from runtime.train.losses import kd_loss  # noqa: E402
from runtime.weights import ModelFile, load_into  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"

RECIPE = """
name: bench
input: 3x32x32
seed: 0
data: {{batch_size: 64, limit_per_class: {per_class}}}
optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.0005}}
schedule: {{name: cosine}}
models: {{teacher: {{spec: {teacher}}}}}
steps:
  - {{name: teacher, kind: train, model: teacher, epochs: {teacher_epochs}}}
  - {{name: train, kind: train, model: student, epochs: {epochs}}}
  - {{name: distill, kind: distill, model: student, teacher: teacher, epochs: {epochs}}}
"""


def first_per_class(ds: datasets.ImageFolder, n: int) -> Subset:
    seen: dict[int, int] = {}
    keep = []
    for i, (_, label) in enumerate(ds.samples):
        if seen.get(label, 0) < n:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return Subset(ds, keep)


def plain_loop(student, teacher, args, train_set, val_set) -> tuple[float, float]:
    """The course's way: PIL ImageFolder + DataLoader; returns (images/s, final val accuracy)."""
    torch.manual_seed(0)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, num_workers=args.workers)
    val_loader = DataLoader(val_set, batch_size=256, shuffle=False, num_workers=args.workers)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start = time.perf_counter()
    best = 0.0
    for _ in range(args.epochs):
        student.train()
        for x, y in loader:
            logits = student(x)
            if teacher is None:
                loss = F.cross_entropy(logits, y)
            else:
                with torch.no_grad():
                    t = teacher(x)
                loss = kd_loss(logits, t, y, 20.0, 0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        student.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (student(x).argmax(1) == y).sum().item()
                total += len(y)
        best = max(best, correct / total)
    seconds = time.perf_counter() - start
    return args.epochs * len(train_set) / seconds, best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain loop")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "bench.yaml"
        recipe.write_text(RECIPE.format(per_class=args.per_class, epochs=args.epochs,
                                        teacher_epochs=args.teacher_epochs, teacher=ROOT / "specs/teacher.spec"))
        out = Path(tmp) / "run"
        run(Options(str(ROOT / "specs/student.spec"), str(recipe), data=str(DATA), out=str(out)))
        report = {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}
        n_train = 10 * args.per_class
        ours = {name: (args.epochs * n_train / report[name]["seconds"], report[name]["val_accuracy"])
                for name in ("train", "distill")}

        # the plain loop: same student architecture and init, same trained teacher
        student_model = compiler.compile_spec(ROOT / "specs/student.spec", params={"classes": 10},
                                              input_shape=(3, 32, 32))
        teacher_model = compiler.compile_spec(ROOT / "specs/teacher.spec", params={"classes": 10},
                                              input_shape=(3, 32, 32))
        teacher = compiler.build_module(teacher_model)
        state = ModelFile(out / "steps/teacher/model.safetensors").state()
        load_into(teacher, state, "teacher")
        teacher.eval()
        tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        train_set = first_per_class(datasets.ImageFolder(DATA / "train", transform=tf), args.per_class)
        val_set = first_per_class(datasets.ImageFolder(DATA / "val", transform=tf), args.per_class)
        plain = {"train": plain_loop(compiler.build_module(student_model).train(), None, args, train_set, val_set),
                 "distill": plain_loop(compiler.build_module(student_model).train(), teacher, args, train_set,
                                       val_set)}
    print(f"cifar10-mini, {n_train} training / {len(val_set)} validation images at 32x32, batch 64, "
          f"{args.epochs} epochs, {torch.get_num_threads()} threads, plain DataLoader workers={args.workers}")
    print(f"{'step':8} {'nccompile img/s':>16} {'plain img/s':>12} {'speed-up':>9} {'nccompile acc':>14} "
          f"{'plain acc':>10}")
    for name in ("train", "distill"):
        (o_ips, o_acc), (p_ips, p_acc) = ours[name], plain[name]
        print(f"{name:8} {o_ips:16.0f} {p_ips:12.0f} {o_ips / p_ips:8.2f}x {o_acc:14.4f} {p_acc:10.4f}")


if __name__ == "__main__":
    main()
