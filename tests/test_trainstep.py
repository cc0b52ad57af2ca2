"""Training steps replayed as CUDA graphs (runtime.train.trainstep).

On the CPU a stand-in takes the graph's place: its capture runs nothing and its replay calls the
step again on the graph's own input tensors. Like a real graph it fails loudly when replayed in a
train mode other than its capture's, or with learning rates read from other tensors than its
capture's (a real graph would silently keep the old ones). So the CPU checks what the step does
around the graph: warm-up, the copies into the graph's inputs, one graph per batch size, learning
rates that follow the schedule without a new capture, the metrics, and training on eagerly when a
capture fails. The CUDA tests run the real graphs."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import compiler
from runtime.data import Split
from runtime.data.batches import Placed
from runtime.data.transforms import Pipeline
from runtime.train.loop import train_epoch
from runtime.train.speed import Speed
from runtime.train.trainstep import WARMUP_STEPS, TrainStep

SIZE = 16


class RecordedStep:
    """CudaGraph's stand-in: capture runs nothing, `replay` calls the captured function again."""

    captures: list = []

    def __init__(self, fn):
        self.fn = fn
        self.captures.append(self)

    def replay(self):
        self.fn()

    @staticmethod
    def warmup(check=False):
        return contextlib.nullcontext([])  # no host syncs found


class ReplayedCall(RecordedStep):
    """The stand-in that also knows the optimizer and the model: it fails where a real graph would
    silently replay in another mode, or read learning rates from tensors other than its capture's."""

    captures: list = []

    def __init__(self, fn):
        self.modules = list(self.net.modules())
        self.training = [m.training for m in self.modules]
        self.lrs = None  # the tensors the optimizer read its learning rates from, at the first replay
        super().__init__(fn)

    def replay(self):
        assert [m.training for m in self.modules] == self.training, "replayed in another mode"
        optimizer, seen = self.optimizer, []
        assert not any(g["capturable"] for g in optimizer.param_groups)  # on only while a graph holds the step
        assert all(isinstance(g["lr"], float) for g in optimizer.param_groups)  # the schedule's numbers

        def step(*args, **kwargs):
            groups = optimizer.param_groups
            assert all(g["capturable"] for g in groups)  # PyTorch refuses capture otherwise
            seen.extend(g["lr"] for g in groups)
            return type(optimizer).step(optimizer, *args, **kwargs)

        optimizer.step = step
        try:
            super().replay()
        finally:
            del optimizer.step
        assert all(isinstance(t, torch.Tensor) for t in seen), "a graph holds numbers it was captured with"
        self.lrs = self.lrs or seen
        assert all(a is b for a, b in zip(seen, self.lrs, strict=True)), "a graph reads its capture's tensors"


class FailingCapture(ReplayedCall):
    def __init__(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def _freeze_batchnorm_from(first: int):
    def hook(epoch, net):
        if epoch >= first:
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()

    return hook


def _train(graphs: bool, graph_type=ReplayedCall, epochs: int = 4, n: int = 70, batch: int = 16, log=None,
           epoch_hook=None):
    """(parameters, per-epoch (loss, correct, seen)) of training the student with AdamW, a learning
    rate that changes every other epoch, and a last batch smaller than the others."""
    model = compiler.compile_spec("specs/student.spec", params={"classes": 10}, input_shape=(3, SIZE, SIZE))
    torch.manual_seed(0)
    module = compiler.build_module(model).train()
    speed = Speed(torch.device("cpu"), "fp32", False, "off", None)
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3, fused=True)
    graph_type.optimizer, graph_type.net = optimizer, module
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen),
                  torch.arange(n) % 10, [])
    ctx = SimpleNamespace(speed=speed, rank=0, world=1, interactive=False,
                          recipe=SimpleNamespace(seed=0, data=SimpleNamespace(batch_size=batch)))
    pipeline = Pipeline([{"flip": 0.5}], "t", 3, (SIZE, SIZE), expect=(SIZE, SIZE))
    placed = Placed(split, speed.device)

    def loss(logits, y, idx, x):
        return F.cross_entropy(logits, y, label_smoothing=0.1)

    step = TrainStep(speed, module, optimizer, None, loss, graphs=graphs, graph_type=graph_type, log=log,
                     label="t")
    history = []
    for epoch in range(epochs):
        history.append(train_epoch(ctx, step, placed, pipeline, epoch, "t", epoch_hook))
        for g in optimizer.param_groups:
            g["lr"] *= 0.5 if epoch % 2 == 0 else 1.0
    step.close()
    return [p.detach().clone() for p in module.parameters()], history


def test_replayed_steps_train_exactly_as_eager_steps():
    ReplayedCall.captures = []
    eager_params, eager_history = _train(graphs=False)
    assert ReplayedCall.captures == []
    params, history = _train(graphs=True)
    assert history == eager_history
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)
    # 70 images in batches of 16: four full ones and a last one of 6. Epochs 2 and 4 start with a new
    # learning rate, which needs no new capture. The full size is captured in epoch 1 (after 2 warm-up
    # steps), the last batch in epoch 3 (warmed up in epochs 1 and 2).
    assert WARMUP_STEPS == 2
    assert len(ReplayedCall.captures) == 2


def test_modes_changed_between_epochs_mean_new_warm_up_steps_and_captures():
    """Quantization-aware training freezes BatchNorm for its last epochs: a graph captured in train
    mode must not be replayed (the stand-in fails if it is), and hooks may need eager steps first."""
    eager_params, eager_history = _train(graphs=False, epoch_hook=_freeze_batchnorm_from(1), epochs=3)
    ReplayedCall.captures = []
    params, history = _train(graphs=True, epoch_hook=_freeze_batchnorm_from(1), epochs=3)
    assert history == eager_history
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
    # full size: captured in epoch 1; epoch 2 (frozen) warms up again and captures; epoch 3 (same
    # modes, another learning rate) replays. The last batch: 2 warm-ups from epoch 2 on.
    assert len(ReplayedCall.captures) == 2, len(ReplayedCall.captures)


def test_a_step_that_cannot_be_captured_trains_on_eagerly_and_says_why():
    eager_params, eager_history = _train(graphs=False)
    said = []
    params, history = _train(graphs=True, graph_type=FailingCapture, log=said.append)
    assert history == eager_history
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
    assert len(said) == 1, said  # once, not per batch
    assert "t: training without CUDA graphs" in said[0] and "RuntimeError: operation not permitted" in said[0]
    assert "more detail" not in said[0]


def test_cuda_graphs_are_a_cuda_default_unless_compiled(monkeypatch):
    from runtime.recipe import SpeedConfig
    from runtime.train.speed import resolve

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a GPU of this decade

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve(SpeedConfig(), cuda).cuda_graphs
    assert "CUDA graphs" in resolve(SpeedConfig(), cuda).describe()
    assert not resolve(SpeedConfig(), cpu).cuda_graphs
    assert not resolve(SpeedConfig(cuda_graphs=True), cpu).cuda_graphs  # the CPU has none
    assert not resolve(SpeedConfig(compile="reduce-overhead"), cuda).cuda_graphs  # compile makes its own
    assert not resolve(SpeedConfig(cuda_graphs=False), cuda).cuda_graphs
    assert not resolve(SpeedConfig(precision="fp16"), cuda).cuda_graphs  # loss scaling checks on the host
    assert not resolve(SpeedConfig(), cuda, ddp=True).cuda_graphs  # DDP's gradient buckets


@pytest.mark.slow
def test_a_whole_run_with_replayed_steps_matches_eager_steps(tmp_path, capsys, in_root, monkeypatch):
    """The loop around the step: cosine schedule, validation, checkpoints, best weights, a random
    crop; the built-in digits, so the CPU suite always runs it."""
    import dataclasses
    import json

    import runtime.run.runner
    import runtime.train.trainstep
    from runtime.cli import main

    def run(name):
        out = tmp_path / name
        args = ["specs/student.spec", "--recipe", "scratch", "--epochs", "3", "--set", "data.batch_size=48",
                "--out", str(out)]
        assert main(args) == 0, capsys.readouterr()
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(out / "steps/train/last.safetensors"), framework="pt") as f:
            history = json.loads(f.metadata()["progress"])["history"]
        return history, load_file(out / "steps/train/model.safetensors")

    eager = run("eager")
    real_resolve = runtime.run.runner.resolve_speed
    monkeypatch.setattr(runtime.run.runner, "resolve_speed",
                        lambda *a, **k: dataclasses.replace(real_resolve(*a, **k), cuda_graphs=True))
    monkeypatch.setattr(runtime.train.trainstep, "CudaGraph", RecordedStep)
    RecordedStep.captures = []
    graphed = run("graphed")
    # one per batch size (full, and the last one): the cosine schedule's new rates need no new capture
    assert len(RecordedStep.captures) == 2

    def same(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rows]

    assert same(graphed[0]) == same(eager[0])
    assert graphed[1].keys() == eager[1].keys()
    assert all(torch.equal(graphed[1][k], eager[1][k]) for k in eager[1])  # the model file's tensors


# --- on a GPU ------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _cuda_train(graphs: bool, loss=None, log=None, epochs: int = 3, qat: bool = False):
    """The student at 32x32 for `epochs` on CUDA (fp32, deterministic cuDNN: graphs replay the same
    kernels), with a learning rate halved after each epoch and a smaller last batch; `qat`: every
    tensor rounded to int4 (one pass per forward, runtime.quant.fusedquant), BatchNorm frozen in the last epoch."""
    from compiler.fileformat import parse_format
    from runtime.quant import fakequant

    device = torch.device("cuda")
    model = compiler.compile_spec("specs/student.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    torch.manual_seed(0)
    module = compiler.build_module(model).to(device)
    if qat:
        fakequant.attach(module, model, parse_format("int4"), "learned")
    module = module.train().to(memory_format=torch.channels_last)
    hook = _freeze_batchnorm_from(epochs - 1) if qat else None
    speed = Speed(device, "fp32", True, "off", None, cuda_graphs=graphs)
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3, fused=True)
    gen = torch.Generator().manual_seed(1)
    n = 200
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % 10, [])
    ctx = SimpleNamespace(speed=speed, rank=0, world=1, interactive=False,
                          recipe=SimpleNamespace(seed=0, data=SimpleNamespace(batch_size=64)))
    pipeline = Pipeline([{"flip": 0.5}, {"crop": {"padding": 4}}], "t", 3, (32, 32), expect=(32, 32))
    placed = Placed(split, device)
    loss = loss or (lambda logits, y, idx, x: F.cross_entropy(logits, y))
    from runtime.train.trainstep import CudaGraph

    class Counted(CudaGraph):
        made = 0

        def __init__(self, fn):
            super().__init__(fn)
            type(self).made += 1

    step = TrainStep(speed, module, optimizer, None, loss, graphs=graphs, graph_type=Counted, log=log, label="t")
    history = []
    for epoch in range(epochs):
        history.append(train_epoch(ctx, step, placed, pipeline, epoch, "t", hook))
        for g in optimizer.param_groups:
            g["lr"] *= 0.5
    captured = (len(step._captured), Counted.made)  # (graphs held at the end, captures made)
    step.close()
    return [p.detach().float().cpu() for p in module.parameters()], history, captured


@cuda_only
@pytest.mark.parametrize("qat", [False, True], ids=["plain", "quantization-aware"])
def test_cuda_graph_training_matches_eager_training(qat):
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        eager, eager_history, _ = _cuda_train(graphs=False, qat=qat)
        graphed, history, captured = _cuda_train(graphs=True, qat=qat)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
    # 200 = 3 x 64 + 8: the full batch, captured once in epoch 1 (new learning rates are refilled, not
    # captured); the last one in epoch 3 after its 2 warm-up epochs. Quantization-aware: BatchNorm froze in
    # epoch 3, so the full batch warmed up and was captured again, and the last one is warming up again.
    assert captured == ((1, 2) if qat else (2, 2))
    for (loss, correct, seen), (eager_loss, eager_correct, eager_seen) in zip(history, eager_history):
        assert seen == eager_seen
        assert loss == pytest.approx(eager_loss, rel=1e-3)
        assert abs(correct - eager_correct) <= 2
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@cuda_only
def test_a_cuda_step_that_reads_the_host_trains_eagerly():
    """`.item()` cannot be captured: the last warm-up step finds the sync, so no capture is tried; the
    step says so once and trains on."""
    said = []

    def loss(logits, y, idx, x):
        value = F.cross_entropy(logits, y)
        value.item()
        return value

    params, history, captured = _cuda_train(graphs=True, loss=loss, log=said.append, epochs=2)
    assert captured == (0, 0) and len(said) == 1 and "without CUDA graphs, the step waits on the host" in said[0]
    assert all(torch.isfinite(p).all() for p in params) and history[-1][2] == 200
    assert torch.ones(3, device="cuda").sum().item() == 3
