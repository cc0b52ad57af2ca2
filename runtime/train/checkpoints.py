"""A training step's checkpoints: `last.safetensors` (model + optimizer + progress in its metadata)
after every epoch, `best.safetensors` when validation improved, and resuming from them.

Each epoch's files are written whole (a temporary file, then a rename), so a run killed at any
moment resumes after the last epoch whose line was printed. With `speed.background_checkpoints`
(on CUDA by default) the tensors are copied to host memory at once and serialized and written on a
thread while the next epoch trains: the GPU does not idle through serialization and fsync, which for
a ResNet18 (134 MB with AdamW's state) costs about as long as an epoch on a small data set.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_path
from ..weights import host_tensor, state_tensors, unwrap

if TYPE_CHECKING:  # typing only: the context calls into this module's callers, not the reverse
    from .context import RunContext


@dataclass
class Progress:
    start: int = 0                 # first epoch still to run
    best_acc: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)
    best_state: dict | None = None


def _optimizer_tensors(optimizer, copy: bool) -> tuple[dict[str, torch.Tensor], str]:
    """AdamW's moments and the like in host memory (copies of their own when `copy`: training goes on
    changing the originals), and the rest as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = host_tensor(v, copy)
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: str) -> None:
    info = json.loads(meta)
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def resume(ctx: RunContext, module, optimizer, schedule, step_dir: Path, key: str, label: str,
           epochs: int) -> Progress:
    """Progress from `last.safetensors` when it belongs to this very step (same key). Everything is
    read and parsed before anything is applied, so a damaged checkpoint leaves a fresh start."""
    last_path, best_path = step_dir / "last.safetensors", step_dir / "best.safetensors"
    if not last_path.exists() or not best_path.exists():
        return Progress()
    from safetensors import safe_open

    try:
        with safe_open(str(last_path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return Progress()
        tensors = load_file(last_path)
        p = json.loads(meta["progress"])
        progress = Progress(p["epoch"] + 1, p["best_acc"], p["best_epoch"], p["history"], load_file(best_path))
        optimizer_meta, schedule_state = meta["optimizer"], json.loads(meta["schedule"])
    except Exception as err:  # a damaged checkpoint costs its epochs, never the run
        ctx.log(f"{label}: cannot resume from {last_path} ({type(err).__name__}: {str(err)[:200]}); "
                "starting this step over")
        return Progress()
    unwrap(module).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    _restore_optimizer(optimizer, tensors, optimizer_meta)
    schedule.load_state_dict(schedule_state)
    ctx.log(f"{label}: resuming after epoch {progress.start} of {epochs}")
    return progress


class CheckpointWriter:
    """Writes each epoch's checkpoint, inline or on a background thread (one write in flight).

    `save` takes what the files need at once (host copies, metadata), so training may go on; `then`
    runs once the files are on disk (the epoch's log line). A failed write raises at the next
    `save` or at `finish`.
    """

    def __init__(self, ctx: RunContext, step_dir: Path, key: str, background: bool):
        self.ctx, self.step_dir, self.key, self.background = ctx, step_dir, key, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, module, optimizer, schedule, epoch: int, progress: Progress, then: Callable[[], None]) -> None:
        self.finish()
        if not self.ctx.is_main:
            then()
            return
        opt_tensors, opt_meta = _optimizer_tensors(optimizer, copy=self.background)
        best = progress.best_state if progress.best_epoch == epoch + 1 else None  # host copies already
        model = best if best is not None else state_tensors(unwrap(module), copy=self.background)  # one copy
        tensors = {**{f"model.{k}": v for k, v in model.items()}, **opt_tensors}
        meta = {"key": self.key, "optimizer": opt_meta, "schedule": json.dumps(schedule.state_dict()),
                "progress": json.dumps({"epoch": epoch, "best_acc": progress.best_acc,
                                        "best_epoch": progress.best_epoch, "history": progress.history})}
        files = ([(self.step_dir / "best.safetensors", _prepared(best))] if best is not None else []) \
            + [(self.step_dir / "last.safetensors", _prepared(tensors, meta))]

        def write():
            for path, write_to in files:
                with atomic_path(path) as tmp:
                    write_to(tmp)
            then()

        if not self.background:
            write()
            return
        self._thread = threading.Thread(target=self._run, args=(write,), name="nccompile-checkpoint")
        self._thread.start()

    @property
    def writing(self) -> bool:
        """Whether a background write is still in flight."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self, write) -> None:
        try:
            write()
        except BaseException as err:  # handed to the training thread at its next save or finish
            self._error = err

    def finish(self, raise_error: bool = True) -> None:
        """Wait for the write in flight; raise its error unless another one is already on its way."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None and raise_error:
            raise err


def _prepared(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[Path], None]:
    """A writer of `tensors` as a safetensors file, with its Python part done now, on the calling
    (training) thread: safetensors' flattening of ~300 tensors, which a background thread would do
    while re-taking the GIL from the training loop hundreds of times. What is left, serialize_file,
    runs with the GIL released. Where safetensors lacks the two functions, save_file does it all."""
    keep_alive: list = []  # the arrays behind the pointers, alive until the file is written
    try:
        from safetensors import serialize_file
        from safetensors.torch import _flatten_as_ptr  # private, safetensors 0.8 (tests compare with save_file)

        flat = _flatten_as_ptr(tensors, keep_alive)
    except (ImportError, TypeError, AttributeError):  # another safetensors: its public function
        return lambda path: save_file(tensors, str(path), metadata=metadata)

    def write_to(path: Path) -> None:
        serialize_file(flat, str(path), metadata=metadata)
        keep_alive.clear()

    return write_to
