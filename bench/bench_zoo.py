"""The zoo against torchvision and Torch-Pruning, in one run.

1. Counts: each specs/zoo spec's parameters and MACs at 224x224 against torchvision's module
   (FlopCounterMode on the meta device).
2. Pruning at the same rate: nccompile keeps half the channels of every prunable space (L1
   importance, per layer); Torch-Pruning's MetaPruner removes half (pruning_ratio 0.5, L1
   magnitude importance, the classifier left alone), on the torchvision module. Parameters and
   MACs after (both by FlopCounterMode), or the error.
3. CPU latency at batch 1, 224x224, of mobilenet_v2 and resnet50 pruned to half their MACs by
   each tool (nccompile: bisection on the analysis; Torch-Pruning: bisection on pruning_ratio,
   counted by FlopCounterMode); both also with channel counts rounded to multiples of 8.
   Median of --runs, the models alternating.

Needs `pip install torch-pruning` (not a dependency of nccompile).
Run: python bench/bench_zoo.py [--runs 30] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from compiler.rewrite.channels import analyse_channels  # noqa: E402
from runtime.rewrite.prune import choose, importance, prune_model, shrink_to  # noqa: E402
from runtime.torchvision_state import torchvision_module  # noqa: E402

ZOO = sorted(p.stem for p in (ROOT / "specs" / "zoo").glob("*.spec"))
SHAPE = (3, 224, 224)


def torchvision_counts(name: str) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    tv = torchvision_module(name, "meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tv(torch.empty(1, *SHAPE, device="meta"))
    return sum(p.numel() for p in tv.parameters()), counter.get_total_flops() // 2


def classifier_of(module: torch.nn.Module) -> list[torch.nn.Module]:
    last = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    return [last]


def tp_prune(name: str, ratio: float, round_to: int | None = None):
    import torch_pruning as tp

    tv = torchvision_module(name)
    x = torch.randn(1, *SHAPE)
    pruner = tp.pruner.MetaPruner(tv, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                  ignored_layers=classifier_of(tv), round_to=round_to)
    pruner.step()
    return tv.eval(), sum(p.numel() for p in tv.parameters()), flop_counter_macs(tv)


def flop_counter_macs(module: torch.nn.Module) -> int:
    """MACs by torch's FlopCounterMode (conv and matmul), the convention nccompile's analysis follows."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module.eval()(torch.randn(1, *SHAPE))
    return counter.get_total_flops() // 2


def ours_prune(name: str, keep: float | None = None, target_macs: int | None = None, multiple: int = 1):
    model = compiler.compile_spec(ROOT / "specs" / "zoo" / f"{name}.spec")
    module = compiler.build_module(model).eval()
    spaces = analyse_channels(model.root)
    scores = importance(module, spaces, "l1")
    if target_macs is not None:
        keep = shrink_to(model, module, scores, "layer", "macs", target_macs, multiple=multiple)
    new_model, new_module, _ = prune_model(model, module, choose(scores, keep, "layer", 1, multiple), spaces)
    a = compiler.analyse(new_model)
    return new_module.eval(), a.params, a.macs


def tp_to(name: str, target: int, round_to: int | None = None):
    """Torch-Pruning at the smallest ratio (bisection) whose MACs are at most `target`."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(8):
        mid = (lo + hi) / 2
        tv, tpp, tpm = tp_prune(name, mid, round_to)
        if tpm <= target:
            hi, best = mid, (tv, tpp, tpm)
        else:
            lo = mid
    return best if best is not None else tp_prune(name, hi, round_to)


def latency(modules: dict[str, torch.nn.Module], runs: int) -> dict[str, float]:
    x = torch.randn(1, *SHAPE)
    times = {k: [] for k in modules}
    with torch.inference_mode():
        for m in modules.values():
            for _ in range(3):
                m(x)
        for _ in range(runs):
            for k, m in modules.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-counts", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import torch_pruning as tp

    print(f"torch {torch.__version__}, torch-pruning {tp.__version__}, {args.threads} threads\n")
    print("| model | params (nccompile = torchvision) | MACs at 224 (nccompile = torchvision) | nccompile keep 0.5: "
          "params / MACs | Torch-Pruning ratio 0.5: params / MACs |\n|---|---|---|---|---|")
    for name in [] if args.skip_counts else ZOO:
        a = compiler.analyse(compiler.compile_spec(ROOT / "specs" / "zoo" / f"{name}.spec"))
        tv_params, tv_macs = torchvision_counts(name)
        try:
            _, op, om = ours_prune(name, keep=0.5)
            ours = f"{op:,} / {om:,}"
        except Exception as err:  # noqa: BLE001 - a benchmark reports failures, it does not stop at them
            ours = f"failed: {type(err).__name__}: {str(err)[:80]}"
        try:
            _, tpp, tpm = tp_prune(name, 0.5)
            theirs = f"{tpp:,} / {tpm:,}"
        except Exception as err:  # noqa: BLE001
            theirs = f"failed: {type(err).__name__}: {str(err)[:80]}"
        print(f"| {name} | {a.params:,} {'=' if a.params == tv_params else '!='} {tv_params:,} | "
              f"{a.macs:,} {'=' if a.macs == tv_macs else '!='} {tv_macs:,} | {ours} | {theirs} |", flush=True)
    if args.skip_latency:
        return
    print("\n| model at half MACs | tool | params | MACs | CPU latency, batch 1 (ms) |\n|---|---|---:|---:|---:|")
    for name in ("mobilenet_v2", "resnet50"):
        _, full_macs = torchvision_counts(name)
        target = full_macs // 2
        ours, op, om = ours_prune(name, target_macs=target)
        ours8, op8, om8 = ours_prune(name, target_macs=target, multiple=8)
        tv, tpp, tpm = tp_to(name, target)
        tv8, tpp8, tpm8 = tp_to(name, target, round_to=8)
        ms = latency({"nccompile": ours, "nccompile8": ours8, "Torch-Pruning": tv, "Torch-Pruning8": tv8}, args.runs)
        print(f"| {name} | nccompile | {op:,} | {om:,} | {ms['nccompile']:.2f} |")
        print(f"| {name} | nccompile, channels rounded to 8 (`round_to: 8`) | {op8:,} | {om8:,} | "
              f"{ms['nccompile8']:.2f} |")
        print(f"| {name} | Torch-Pruning | {tpp:,} | {tpm:,} | {ms['Torch-Pruning']:.2f} |")
        print(f"| {name} | Torch-Pruning, `round_to=8` | {tpp8:,} | {tpm8:,} | {ms['Torch-Pruning8']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
