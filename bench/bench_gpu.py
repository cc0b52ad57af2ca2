"""nccompile's `train` and `distill` on a GPU against two plain PyTorch loops, in one process.

Same data (decoded once to uint8 at --input), same modules (built from specs/student.spec and
specs/teacher.spec), same optimizer (AdamW, lr 3e-3, wd 5e-4), same batch size:

  naive  fp32, batches copied from host memory, `loss.item()` after every step
  tuned  uint8 images on the GPU, bf16 autocast, channels_last, fused AdamW, no per-step sync
  nccompile  the `train` / `distill` step with the recipe's default speed settings (on CUDA: steps
             replayed as CUDA graphs; `--cuda-graphs on off` also measures eager steps)

For distillation the plain loops run the teacher on every batch without gradients, in the
loop's precision; nccompile computes the teacher's logits once when there is no random
augmentation (the default here, --augment none), as its distill step does.

Throughput = training images / training time of one epoch (CUDA-synchronized; validation not
counted), the median over epochs 2..E, so one-time costs (decoding, cuDNN autotuning, torch.compile)
are left out on every side. Accuracy = validation accuracy after the last epoch.

The tuned loop and nccompile run --repeats times each, alternating (tuned first, then nccompile
first, ...), because one GPU's throughput drifts between runs by more than the gap being measured;
the table gives medians and the range of the per-repeat ratios. --idle S makes the plain loops
wait S seconds after each epoch, as nccompile does while it validates and writes its checkpoint:
if the GPU is slower after idling, the tuned loop shows it too.

Run (GPU):  python bench/bench_gpu.py [--data DIR] [--input 3x128x128] [--epochs 3] [--batch 64 256] [--repeats 3]
Smoke test: python bench/bench_gpu.py --device cpu --input 3x32x32 --per-class 20 --epochs 2 --batch 32
"""
from __future__ import annotations

import argparse
import contextlib
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
from runtime.data import list_source, load  # noqa: E402
from runtime.recipe import DataConfig  # noqa: E402
from runtime.run.runner import Options, run  # noqa: E402
from runtime.train.losses import kd_loss  # noqa: E402

RECIPE = """
name: bench_gpu
seed: 0
data: {{batch_size: {batch}, eval_batch_size: 512, limit_per_class: {per_class}}}
transforms: {{train: {train_tf}, eval: []}}
optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.0005}}
schedule: {{name: {schedule}}}
speed: {{compile: {compile}, background_checkpoints: {background}, cudnn_benchmark: {autotune}, cuda_graphs: {graphs}}}
models: {{teacher: {{spec: {teacher}, checkpoint: {teacher_ckpt}}}}}
steps:
  - {{name: step, kind: {kind}, model: {model}, epochs: {epochs}{extra}}}
"""


@contextlib.contextmanager
def profiled(enabled: bool, title: str, device):
    """torch.profiler around the block; prints its top operators by device (or CPU) time."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\n== profile: {title}\n" + prof.key_averages().table(sort_by=key, row_limit=15), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(spec: str, shape, seed=0):
    model = compiler.compile_spec(ROOT / "specs" / spec, params={"classes": 10}, input_shape=shape)
    return model, compiler.build_module(model, seed=seed)


def accuracy(module, images, labels, device, tuned: bool) -> float:
    module.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=tuned):
        for s in range(0, len(images), 512):
            x = images[s:s + 512].to(device).float().div_(255)
            if tuned:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += (module(x).argmax(1) == labels[s:s + 512].to(device)).sum().item()
    module.train()
    return correct / len(images)


def plain_loop(kind: str, module, teacher, data, device, batch: int, epochs: int,
               idle: float = 0.0) -> tuple[float, float]:
    """(median img/s over epochs 2..E, final val accuracy) of the naive or tuned loop; `idle` seconds of
    waiting after each epoch (outside the timed part)."""
    tuned = kind == "tuned"
    module = module.to(device).train()  # build_module returns eval mode
    if teacher is not None:
        teacher = teacher.to(device).eval()
    if tuned:
        module = module.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    extra = {"fused": True} if tuned and device.type == "cuda" else {}
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=5e-4, **extra)
    images, labels = data.train.images, data.train.labels
    if tuned:
        images, labels = images.to(device), labels.to(device)
    rates = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(images), generator=g)
        if tuned:
            order = order.to(device)
        sync(device)
        t0 = time.perf_counter()
        for idx in torch.split(order, batch):
            x, y = images[idx].to(device, non_blocking=tuned), labels[idx].to(device, non_blocking=tuned)
            x = x.float().div_(255)
            if tuned:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tuned):
                logits = module(x)
                if teacher is not None:
                    with torch.no_grad():
                        t = teacher(x)
                    loss = kd_loss(logits, t, y, 20.0, 0.5)
                else:
                    loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not tuned:
                loss.item()
        sync(device)
        rates.append(len(images) / (time.perf_counter() - t0))
        time.sleep(idle)
    return statistics.median(rates[1:] or rates), accuracy(module, data.val.images, data.val.labels, device, tuned)


def nccompile_step(kind: str, model_name: str, shape, args, batch: int, teacher_ckpt: Path, tmp: Path,
                   graphs: str = "on"):
    recipe = tmp / f"{kind}-{model_name}-{batch}.yaml"
    spec = "student.spec" if model_name == "student" else "teacher.spec"
    extra = ", teacher: teacher" if kind == "distill" else ""
    train_tf = "[{flip: 0.5}, {crop: {padding: 4}}]" if args.augment == "flipcrop" else "[]"
    recipe.write_text(RECIPE.format(batch=batch, schedule=args.schedule, per_class=args.per_class or "null",
                                    train_tf=train_tf,
                                    compile=args.compile, background=str(args.checkpoints == 'background').lower(),
                                    autotune=str(args.cudnn_benchmark == 'on').lower(),
                                    graphs=str(graphs == "on").lower(),
                                    teacher=ROOT / "specs/teacher.spec",
                                    teacher_ckpt=teacher_ckpt, kind=kind,
                                    model="student", epochs=args.epochs, extra=extra))
    out = Path(tempfile.mkdtemp(prefix=f"run-{kind}-{model_name}-{batch}-", dir=tmp))  # a fresh run each repeat
    code = run(Options(str(ROOT / "specs" / spec), str(recipe), data=str(args.data), out=str(out),
                       device=args.device, input=shape))
    if code != 0:
        raise RuntimeError(f"the run exited with {code} (its messages are above)")
    from safetensors import safe_open

    with safe_open(str(out / "steps/step/last.safetensors"), framework="pt") as f:
        history = json.loads(f.metadata()["progress"])["history"]
    rates = [h["images_per_second"] for h in history]
    return statistics.median(rates[1:] or rates), history[-1]["val_accuracy"]


def compare(step: str, model_name: str, batch: int, args, shape, data, device, teacher, teacher_ckpt: Path,
            tmp: Path) -> dict:
    """One row: the naive loop once, then the tuned loop and nccompile `args.repeats` times each, alternating."""
    spec = "student.spec" if model_name == "student" else "teacher.spec"

    def plain(loop):
        torch.manual_seed(0)
        _, module = build(spec, shape)
        t = None
        if step == "distill":
            _, t = build("teacher.spec", shape)
            t.load_state_dict(teacher.state_dict())
        with profiled(args.profile and loop == "tuned", f"{step} {model_name} {batch} tuned", device):
            return plain_loop(loop, module, t, data, device, batch, args.epochs, args.idle)

    def ours(graphs):
        with profiled(args.profile, f"{step} {model_name} {batch} nccompile (CUDA graphs {graphs})", device):
            return nccompile_step(step, model_name, shape, args, batch, teacher_ckpt, tmp, graphs)

    variants = [("nccompile" if g == args.cuda_graphs[0] else f"nccompile-graphs-{g}", g) for g in args.cuda_graphs]
    result = {"naive": [plain("naive")], "tuned": [], **{name: [] for name, _ in variants}}
    for r in range(args.repeats):
        turn = [("tuned", lambda: plain("tuned"))] + [(name, lambda g=g: ours(g)) for name, g in variants]
        for loop, measure in turn if r % 2 == 0 else turn[::-1]:
            try:
                result[loop].append(measure())
            except Exception as err:  # noqa: BLE001 - one failing configuration must not cost the others
                print(f"{step} {model_name} batch {batch} {loop}: FAILED {type(err).__name__}: {err}", flush=True)
                result[loop].append((float("nan"), float("nan")))
            rate, acc = result[loop][-1]
            print(f"{step:8s} {model_name:8s} batch {batch:4d} {loop:10s} {rate:10.0f} img/s "
                  f"val acc {acc:.4f}  (repeat {r + 1})", flush=True)
    def ratios(name):
        return [c[0] / t[0] for c, t in zip(result[name], result["tuned"])]

    def key(name):  # the default variant's ratio is `vs_tuned`, another's `<name>_vs_tuned`
        return "vs_tuned" if name == "nccompile" else f"{name}_vs_tuned"

    return {"step": step, "model": model_name, "batch": batch,
            **{f"{loop}_images_per_second": statistics.median(m[0] for m in runs) for loop, runs in result.items()},
            **{f"{loop}_val_accuracy": runs[-1][1] for loop, runs in result.items()},
            **{key(name): statistics.median(ratios(name)) for name, _ in variants},
            **{key(name) + "_range": [min(ratios(name)), max(ratios(name))] for name, _ in variants},
            "runs": {loop: [m[0] for m in runs] for loop, runs in result.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-mini")
    p.add_argument("--input", default="3x128x128")
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--models", nargs="+", default=["student", "teacher"])
    p.add_argument("--steps", nargs="+", default=["train", "distill"])
    p.add_argument("--augment", choices=["none", "flipcrop"], default="none")
    p.add_argument("--compile", default="off", help="nccompile's speed.compile (off, default, reduce-overhead)")
    p.add_argument("--checkpoints", choices=["background", "inline"], default="background",
                   help="how nccompile writes its epoch checkpoints (background: the CUDA default)")
    p.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on",
                   help="nccompile's speed.cudnn_benchmark (on: the CUDA default; the plain loops never set it)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="nccompile's learning-rate schedule (cosine: a new learning rate every epoch, "
                        "refilled into the graphs; the plain loops keep theirs constant)")
    p.add_argument("--cuda-graphs", nargs="+", choices=["on", "off"], default=["on"],
                   help="nccompile's speed.cuda_graphs (on: the CUDA default); `on off` measures both, alternating")
    p.add_argument("--repeats", type=int, default=3, help="tuned and nccompile measurements each, alternating")
    p.add_argument("--idle", type=float, default=0.0,
                   help="seconds the plain loops wait after each epoch (as nccompile validates and checkpoints)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top kernels of the tuned loop and of nccompile's step "
                        "(whole runs, validation included), to find where they differ")
    args = p.parse_args()
    device = torch.device(args.device)
    shape = compiler.parse_shape(args.input)
    cfg = DataConfig(path=str(args.data), limit_per_class=args.per_class)
    data = load(list_source(cfg), cfg, shape, 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; {len(data.train)} train / {len(data.val)} val images at "
          f"{args.input}; {args.epochs} epochs per measurement, {args.repeats} repeats; augmentation "
          f"{args.augment}; plain loops idle {args.idle:g} s after each epoch", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # one trained teacher for every distillation (the plain loops and nccompile alike)
        t_model, teacher = build("teacher.spec", shape)
        from runtime.weights import save_model

        plain_loop("tuned", teacher, None, data, device, 256, 1)
        teacher_ckpt = tmp / "teacher.safetensors"
        save_model(teacher.cpu(), t_model, teacher_ckpt)
        for step in args.steps:
            for model_name in args.models:
                if step == "distill" and model_name == "teacher":
                    continue  # the teacher is not distilled from itself
                for batch in args.batch:
                    rows.append(compare(step, model_name, batch, args, shape, data, device, teacher, teacher_ckpt,
                                        tmp))
                    if args.json:  # after every row: a run cut short by a time limit keeps what it measured
                        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    others = [f"nccompile-graphs-{g}" for g in args.cuda_graphs[1:]]
    print("\n| step | model | batch | naive img/s | tuned img/s | nccompile img/s | vs naive | vs tuned (range) | "
          + "".join(f"{o} vs tuned (range) | " for o in others)
          + "val acc (naive / tuned / nccompile) |\n|---|---|---:|---:|---:|---:|---:|---:|"
          + "---:|" * len(others) + "---|")
    for r in rows:
        n, t, c = (r[f"{k}_images_per_second"] for k in ("naive", "tuned", "nccompile"))
        lo, hi = r["vs_tuned_range"]
        extra = "".join(f"{r[o + '_vs_tuned']:.2f}x ({r[o + '_vs_tuned_range'][0]:.2f}-"
                        f"{r[o + '_vs_tuned_range'][1]:.2f}) | " for o in others)
        print(f"| {r['step']} | {r['model']} | {r['batch']} | {n:,.0f} | {t:,.0f} | {c:,.0f} | {c / n:.2f}x | "
              f"{r['vs_tuned']:.2f}x ({lo:.2f}-{hi:.2f}) | {extra}{r['naive_val_accuracy']:.3f} / "
              f"{r['tuned_val_accuracy']:.3f} / {r['nccompile_val_accuracy']:.3f} |")

if __name__ == "__main__":
    main()
