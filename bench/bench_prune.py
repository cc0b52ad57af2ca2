"""Pruning and low-rank factorization: CPU latency and the accuracy-parameters trade-off.

1. Latency: the student at the course's input (3x256x256), pruned by BatchNorm gamma to
   about half its MACs (`target_macs`), against the unpruned student; batch 1, median.
2. Trade-off on cifar10-mini (32x32): the student trained from scratch, then pruned at
   several keep-rates (one iteration + fine-tuning each, a `prune` sweep); ResNet18 (the
   DSL spec) trained, then factorized by truncated SVD at several energies (+ fine-tuning).
   Runs share one run directory, so each trained model is trained once.

Run: python bench/bench_prune.py [--per-class 300] [--epochs 8]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from compiler.rewrite.channels import analyse_channels  # noqa: E402
from runtime.deploy.latency import latency_ms  # noqa: E402
from runtime.rewrite.prune import choose, importance, prune_model, shrink_to  # noqa: E402
from runtime.run.runner import Options, run  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-mini"

PRUNE = """
name: bench_prune
input: 3x32x32
data: {{batch_size: 64, limit_per_class: {per_class}}}
steps:
  - {{name: train, kind: train, epochs: {epochs}}}
  - {{name: sweep, kind: prune, importance: bn, rates: [0.9, 0.75, 0.5, 0.35], iterations: 1,
      finetune: {{epochs: 2, lr: 0.001}}, latency: false}}
"""

LOWRANK = """
name: bench_lowrank
input: 3x32x32
data: {{batch_size: 64, limit_per_class: {per_class}}}
steps:
  - {{name: train, kind: train, epochs: {epochs}}}
  - {{name: lowrank_{tag}, kind: lowrank, rank_by: energy, energy: {energy}, finetune: {{epochs: 1, lr: 0.001}}}}
"""


def latency_table(weights: Path | None = None, runs: int = 60) -> list[tuple]:
    """The student against itself pruned by BatchNorm gamma to about half its MACs (channel
    counts multiples of 8), two ways: every layer keeping the same fraction, and globally with
    channels ranked by gamma / sqrt(activations per channel) (`cost: activations`), which prunes
    the high-resolution layers harder. Eager fp32, measured alternately."""
    model = compiler.compile_spec(ROOT / "specs/student.spec", params={"classes": 10})  # 3x256x256
    module = compiler.build_module(model).eval()
    if weights is not None:  # the trained student (fully convolutional: same weights at 256x256)
        from runtime.weights import ModelFile, load_into

        load_into(module, ModelFile(weights).state(), str(weights))
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, "bn")
    target = compiler.analyse(model).macs // 2
    costs = {s: spaces.activations_per_channel(s) for s in scores}
    variants = {"student": (model, module)}
    for label, scope, options in (("uniform per layer", "layer", {}),
                                  ("global, cost: activations", "global", {"costs": costs, "min_rate": 0.25})):
        rate = shrink_to(model, module, scores, scope, "macs", target, multiple=8, **options)
        pruned_model, pruned, _ = prune_model(model, module, choose(scores, rate, scope, multiple=8, **options),
                                              spaces)
        variants[label] = (pruned_model, pruned.eval())
    x = torch.randn(1, 3, 256, 256)
    times = {label: [] for label in variants}
    for _ in range(5):  # alternate blocks of runs so every variant sees the same machine state
        for label, (_, mod) in variants.items():
            times[label].append(latency_ms(mod, x, runs=runs // 5))
    rows = []
    for label, (m, _) in variants.items():
        a = compiler.analyse(m)
        rows.append((label, a.params, a.macs, sorted(times[label])[2]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--resnet-epochs", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prune.yaml").write_text(PRUNE.format(per_class=args.per_class, epochs=args.epochs))
        run(Options(str(ROOT / "specs/student.spec"), str(tmp / "prune.yaml"), data=str(DATA), out=str(tmp / "prune")))
        prune_rows = list(csv.DictReader((tmp / "prune/steps/sweep/pruning_curve.csv").open()))
        lat = latency_table(tmp / "prune/steps/train/model.safetensors")
        lowrank_rows = []
        for energy in (0.95, 0.85, 0.7, 0.5):
            tag = str(energy).replace(".", "")
            recipe = tmp / f"lowrank{tag}.yaml"
            recipe.write_text(LOWRANK.format(per_class=args.per_class, epochs=args.resnet_epochs, energy=energy,
                                             tag=tag))
            run(Options(str(ROOT / "specs/resnet18.spec"), str(recipe), data=str(DATA), out=str(tmp / "lowrank")))
            steps = {s["name"]: s for s in json.loads((tmp / "lowrank/report.json").read_text())["steps"]}
            if not lowrank_rows:
                t = steps["train"]
                lowrank_rows.append(("resnet18 (trained)", t["params"], t["macs"], t["val_accuracy"]))
            s = steps[f"lowrank_{tag}"]
            lowrank_rows.append((f"energy {energy}", s["params"], s["macs"], s["val_accuracy"]))
    print("CPU latency, batch 1, 3x256x256 (median of 5 alternating blocks of 12 runs):")
    for label, params, macs, ms in lat:
        print(f"  {label:24} {params:>9,} params {macs:>13,} MACs {ms:8.2f} ms")
    for label, _, macs, ms in lat[1:]:
        print(f"  {label}: {lat[0][3] / ms:.2f}x faster at {macs / lat[0][2]:.2f} of the MACs")
    print(f"\nstudent pruning by BN gamma on cifar10-mini ({10 * args.per_class} train images, trained {args.epochs} "
          "epochs; one iteration + 2 fine-tuning epochs per rate):")
    for r in prune_rows:
        if r["iteration"] == "0" and r["run"] != prune_rows[0]["run"]:
            continue
        label = "unpruned" if r["iteration"] == "0" else r["run"]
        print(f"  {label:24} {int(r['params']):>9,} params {int(r['macs']):>13,} MACs  "
              f"val acc {float(r['val_accuracy']):.4f}")
    print(f"\nresnet18 low-rank (truncated SVD of 3x3 convs and fc, 1 fine-tuning epoch), trained "
          f"{args.resnet_epochs} epochs:")
    for label, params, macs, acc in lowrank_rows:
        print(f"  {label:24} {params:>9,} params {macs:>13,} MACs  val acc {acc:.4f}")


if __name__ == "__main__":
    main()
