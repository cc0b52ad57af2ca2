"""One optimization step of the training loop: run eagerly, or replayed as a whole-step CUDA graph.

A small CNN at batch 64 on a GPU is bound by kernel launches, not arithmetic: an eager step
launches some 700 kernels from Python. With `speed.cuda_graphs` (on CUDA by default) the whole
step (forward, loss, backward, optimizer, metric updates) is captured once per batch size, after
a few eager warm-up steps, and replayed with one launch; each batch is first copied into the
graph's own input tensors (PyTorch's "whole-network capture"). The optimizer reads its learning
rates from device tensors in the graph, refilled when the schedule moves them, so a new rate needs
no new capture. What else Python decided at capture stays: every module's train/eval mode (frozen
BatchNorm in quantization-aware training means new warm-up steps, then a new capture, as hooks may
build new constants); modes change only between epochs. A step that cannot be captured (a loss that
reads a value on the host, say) trains eagerly and says why, once.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import Callable

import torch

WARMUP_STEPS = 2  # eager steps per batch size before its capture: optimizer state, cuDNN's autotuning
# a learning rate as the fused optimizer kernels read it from a tensor: float on CUDA, double on the CPU
LR_DTYPES = {"cuda": torch.float32, "cpu": torch.float64}


class CudaGraph:
    """One call of `fn` captured as a CUDA graph; `replay` runs its kernels again."""

    def __init__(self, fn: Callable[[], None]):
        self.graph = torch.cuda.CUDAGraph()
        outer, raised = torch.cuda.current_stream(), []

        def body():
            try:
                fn()
            except BaseException as err:  # the cause, before capture_end's own "invalidated" error
                raised.append(err)
                raise

        try:
            # thread_local: only this thread's calls can spoil the capture, not the checkpoint writer's
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                body()
        except BaseException as err:
            torch.cuda.set_stream(outer)  # a failed capture_end leaves the capture stream current
            raise (raised[0] if raised else err) from None

    def replay(self) -> None:
        self.graph.replay()

    @staticmethod
    @contextlib.contextmanager
    def warmup(check: bool = False):
        """Steps before a capture run on a side stream, as PyTorch's whole-network capture asks.
        `check`: list the step's host syncs (what a capture cannot hold) rather than fail a capture."""
        side, found = torch.cuda.Stream(), []
        side.wait_stream(torch.cuda.current_stream())
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) if check else contextlib.nullcontext([]) as seen:
            if check:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.cuda.stream(side):
                    yield found
            finally:
                torch.cuda.set_sync_debug_mode(before)
                torch.cuda.current_stream().wait_stream(side)
        for w in seen:
            if "synchroniz" in str(w.message):
                found.append(str(w.message).strip().splitlines()[0])
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _Graphed:
    """A captured step with the inputs it reads and the tensors it writes that nothing else holds."""

    def __init__(self, graph, inputs: tuple[torch.Tensor, ...], keep: list):
        self.graph, self.inputs, self.keep = graph, inputs, keep

    def replay(self, *batch: torch.Tensor) -> None:
        for fixed, t in zip(self.inputs, batch):
            fixed.copy_(t)
        self.graph.replay()


@contextlib.contextmanager
def _capturable(optimizer, lrs: list[torch.Tensor]):
    """The optimizer as a graph captures it: `capturable` (PyTorch's optimizers refuse capture without
    it; the fused kernels behave the same either way) and the learning rates read from `lrs`. Both
    are restored after: eager steps with the flag on warn, and checkpoints keep plain numbers."""
    groups = optimizer.param_groups
    before = [(g["lr"], g.get("capturable")) for g in groups]
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
        if "capturable" in g:
            g["capturable"] = True
    try:
        yield
    finally:
        for g, (lr, flag) in zip(groups, before):
            g["lr"] = lr
            if flag is not None:
                g["capturable"] = flag


class TrainStep:
    """The training step of one `fit`, with the epoch's loss sum and correct count on the device.

    `graphs`: capture and replay (runtime.train.speed decides when that is safe: CUDA, no DDP, no compile,
    no loss scaling). `graph_type` is CudaGraph unless given (tests give a stand-in on the CPU). Call
    `start_epoch` once the epoch's modes and learning rates are set.
    """

    def __init__(self, speed, net: torch.nn.Module, optimizer, scaler, loss_fn, *, graphs: bool = False,
                 graph_type=None, log: Callable[[str], None] | None = None, label: str = ""):
        self.speed, self.net, self.optimizer, self.scaler, self.loss_fn = speed, net, optimizer, scaler, loss_fn
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=speed.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=speed.device)
        self.graphs = graphs
        self._graph_type = graph_type or CudaGraph
        self._captured: dict[int, _Graphed] = {}
        self._eager_steps: Counter[int] = Counter()
        self._log, self._label = log or (lambda message: None), label
        # what every graph reads its learning rates from; filled, never replaced, as the schedule moves
        lr_dtype = LR_DTYPES.get(speed.device.type, torch.float32)
        self._lrs = [torch.zeros((), dtype=lr_dtype, device=speed.device) for _ in optimizer.param_groups]
        self._modes: tuple = ()

    def start_epoch(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        if self.graphs:
            for t, g in zip(self._lrs, self.optimizer.param_groups):
                t.fill_(float(g["lr"]))  # a kernel, no host sync
            modes = tuple(m.training for m in self.net.modules())
            if modes != self._modes:  # e.g. BatchNorm frozen: new warm-up steps, new captures
                self._captured.clear()
                self._eager_steps.clear()
            self._modes = modes

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        if not self.graphs:
            self.run(x, y, idx)
            return
        n = idx.shape[0]
        graphed = self._captured.get(n)
        if graphed is None:
            if self._eager_steps[n] < WARMUP_STEPS:
                self._eager_steps[n] += 1
                with self._graph_type.warmup(check=self._eager_steps[n] == WARMUP_STEPS) as syncs:
                    self.run(x, y, idx)
                if syncs:  # the first steps may sync (autotuning, constants), not the last one before capture
                    self._eager_from_now(f"the step waits on the host ({syncs[0][:120]})")
                return
            graphed = self._capture(x, y, idx)
            if graphed is None:  # not capturable: this batch trained eagerly, and so will the rest
                return
        graphed.replay(x, y, idx)

    def run(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        """The step itself, eagerly (also what a graph captures)."""
        with self.speed.autocast():
            logits = self.net(x)
            loss = self.loss_fn(logits, y, idx, x)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.loss_sum.add_(loss.detach(), alpha=idx.shape[0])  # one kernel per metric update
        self.correct.add_((logits.argmax(1) == y).sum())

    def _captured_run(self, inputs) -> None:
        """The step as a graph holds it (what a graph captures, or a stand-in replays)."""
        with _capturable(self.optimizer, self._lrs):
            self.run(*inputs)

    def close(self) -> None:
        """Free the graphs and the memory they hold (the next step trains another model)."""
        self._captured.clear()
        if self.graphs:
            self.optimizer.zero_grad(set_to_none=True)

    def _eager_from_now(self, why: str) -> None:
        self.graphs = False
        self._captured.clear()  # its gradients go at the next step's zero_grad
        self._log(f"{self._label}: training without CUDA graphs, {why}")

    def _capture(self, x, y, idx) -> _Graphed | None:
        inputs = (x.clone(), y.clone(), idx.clone())  # clone keeps channels_last
        self.optimizer.zero_grad(set_to_none=True)  # gradients of the graph's own, made in the capture
        try:
            graph = self._graph_type(lambda: self._captured_run(inputs))
        except Exception as err:  # noqa: BLE001 - any failure to capture means: train eagerly
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            self._eager_from_now(f"the step could not be captured ({type(err).__name__}: {reason})")
            self.run(x, y, idx)
            return None
        keep = [p.grad for p in self.net.parameters()]  # the graph writes them; they must outlive it
        graphed = _Graphed(graph, inputs, keep)
        self._captured[idx.shape[0]] = graphed
        return graphed
