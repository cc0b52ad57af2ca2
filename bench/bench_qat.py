"""Quantization-aware training's cost per step: every stored tensor rounded on its own
(runtime.quant.fakequant, the per-tensor path) against all of them in one pass (runtime.quant.fusedquant),
and plain training beside them. Prints operators dispatched per step (each one a kernel launch
on a GPU, where small models are bound by launches) and img/s, median of --repeats timed runs.

AdamW runs fused (one kernel for all parameters), as nccompile's steps do on the CPU and CUDA;
`--optimizers loop foreach fused` compares its implementations too. On CUDA, plain training and
the one-pass rounding also run as nccompile's steps replayed as CUDA graphs (runtime.train.trainstep,
its default there): one launch per step.

Run: python bench/bench_qat.py [--device cpu|cuda] [--input 3x32x32] [--batch 64] [--format int4]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from compiler.fileformat import parse_format  # noqa: E402
from runtime.quant import fakequant  # noqa: E402
from runtime.train.speed import Speed  # noqa: E402
from runtime.train.trainstep import TrainStep  # noqa: E402
from tests.measure import Dispatched  # noqa: E402

IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input", default="3x32x32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--format", default="int4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--optimizers", nargs="+", choices=["loop", "foreach", "fused"], default=["fused"],
                   help="AdamW implementations to run each configuration with")
    args = p.parse_args()
    device = torch.device(args.device)
    shape = compiler.parse_shape(args.input)
    model = compiler.compile_spec(ROOT / "specs/student.spec", params={"classes": 10}, input_shape=shape)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    x = x.contiguous(memory_format=torch.channels_last)  # nccompile's default on CUDA and x86 CPUs
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{name}; torch {torch.__version__}; student at {args.input}, batch {args.batch}, {args.format}"
          f"{', bf16 autocast' if cuda else ', fp32'}, channels_last")
    print("| training | AdamW | operators per step | img/s (median) | vs plain, fused AdamW |\n"
          "|---|---|---:|---:|---:|")
    plain_rate = None
    runs = [(label, fused, impl, False) for label, fused in (("plain (no rounding)", None),
                                                             ("QAT, per tensor", False), ("QAT, one pass", True))
            for impl in sorted(args.optimizers, key=lambda i: i != "fused")]
    if cuda:
        runs += [("plain, CUDA graph", None, "fused", True), ("QAT, one pass, CUDA graph", True, "fused", True)]
    for label, fused, impl, graphed in runs:
        torch.manual_seed(0)
        module = compiler.build_module(model, seed=0).to(device).train()
        module = module.to(memory_format=torch.channels_last)
        if fused is not None:
            fakequant.attach(module, model, parse_format(args.format), "learned", fused=fused)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3, **IMPLEMENTATIONS[impl])

        def step(module=module, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if graphed:  # nccompile's step: captured after its warm-up steps, then one replay per call
            speed = Speed(device, "bf16", True, "off", None, cuda_graphs=True)
            train_step = TrainStep(speed, module, opt, None,
                                   lambda logits, y, idx, x: torch.nn.functional.cross_entropy(logits, y), graphs=True)
            train_step.start_epoch()
            step = functools.partial(train_step, x, y, torch.arange(args.batch, device=device))

        for _ in range(3):
            step()
        with Dispatched() as counted:
            step()
        rates = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            rates.append(args.steps * args.batch / (time.perf_counter() - t0))
        rate = statistics.median(rates)
        plain_rate = plain_rate or rate
        print(f"| {label} | {impl} | {sum(counted.ops.values()):,} | {rate:,.0f} | {rate / plain_rate:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
