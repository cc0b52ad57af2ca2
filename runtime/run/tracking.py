"""Runs where people already watch them: TensorBoard event files in the run directory (`--track
tensorboard`, the `tracking` extra), written beside report.json, never instead of it.

What a run logs: the recipe and the spec as text, the budgets, each training epoch's scalars (loss,
accuracy, learning rate) under the step's name, each step's model (parameters, MACs, file bytes,
accuracy) at the step's index, and every PNG a step writes (confusion matrix, curves) as an image.
"""
from __future__ import annotations

from pathlib import Path

from compiler.errors import NcError

TRACKERS = ("tensorboard",)
EXTRA = "pip install -e '.[tracking]'"
EPOCH_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_second")
STEP_SCALARS = ("params", "macs", "file_bytes", "val_accuracy")


class TensorBoard:
    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise NcError(f"--track tensorboard: the tensorboard package is not installed; {EXTRA}") from None
        self.out = out
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def start(self, recipe_text: str, spec_text: str, budgets: list[str]) -> None:
        self.writer.add_text("recipe", f"```\n{recipe_text}\n```")
        self.writer.add_text("spec", f"```\n{spec_text}\n```")
        if budgets:
            self.writer.add_text("budgets", "\n\n".join(budgets))

    def epoch(self, label: str, row: dict) -> None:
        step = label.split(" ", 1)[0]  # a training step's epochs are labelled by its name
        for key in EPOCH_SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(f"{step}/{key}", row[key], row["epoch"])

    def step(self, index: int, entry: dict) -> None:
        for key in STEP_SCALARS:
            if isinstance(entry.get(key), (int, float)):
                self.writer.add_scalar(f"steps/{key}", entry[key], index)
        for name in entry.get("files", []):
            if name.endswith(".png") and (self.out / name).is_file():
                self._image(f"{entry['name']}/{Path(name).stem}", self.out / name, index)
        self.writer.flush()

    def _image(self, tag: str, path: Path, index: int) -> None:
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image(tag, pixels, index, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def require(names: tuple[str, ...]) -> None:
    """Known trackers whose libraries are installed, or an error that names the extra."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise NcError(f"--track {unknown[0]}: unknown tracker; known: {', '.join(TRACKERS)}")
    if "tensorboard" in names:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise NcError(f"--track tensorboard: the tensorboard package is not installed; {EXTRA}")


def trackers(names: tuple[str, ...], out: Path) -> list:
    require(names)
    return [TensorBoard(out) for n in dict.fromkeys(names) if n == "tensorboard"]
