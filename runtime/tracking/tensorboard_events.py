"""`--track tensorboard`: event files in OUT/tensorboard, read by `tensorboard --logdir runs`.

What a run logs: the recipe and the spec as text, the budgets, each training epoch's scalars (loss,
accuracy, learning rate) under the step's name, each step's model (parameters, MACs, file bytes,
accuracy) at the step's index, and every PNG a step writes (confusion matrix, curves) as an image.
"""
from __future__ import annotations

from pathlib import Path

EPOCH_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_second")
STEP_SCALARS = ("params", "macs", "file_bytes", "val_accuracy")


class TensorBoard:
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs tensorboard: tracking.require() checked it
        self.out = out
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def start(self, recipe_text: str, spec_text: str, budgets: list[str], params: dict) -> None:
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

    def close(self, error: BaseException | None = None) -> None:
        self.writer.close()

