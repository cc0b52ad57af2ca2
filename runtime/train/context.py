"""What steps see while a recipe runs: models, data, device, run directory, ranks."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import compiler
from compiler.analysis import predicted_bytes
from compiler.tree import Model

from ..data import Data, Listing, load
from ..data.batches import Placed
from ..data.transforms import Pipeline
from ..recipe import Recipe
from ..rundir import RunDir
from ..weights import ModelFile, save_model, unwrap
from . import distributed
from .evaluation import logits_of, score
from .speed import Speed, resolve


@dataclass
class ModelSlot:
    """A model of the run and its current weights (the latest artifact)."""

    name: str
    model: Model
    weights: Path | None = None          # current weights file; None = fresh initialisation
    producer: str | None = None          # step name, or 'checkpoint'
    producer_key: str = "init"           # hash of whatever produced the weights
    torchvision_weights: str | None = None
    torchvision_state: Path | None = None  # torchvision's weights for a zoo spec (runtime.torchvision_state)

    def build(self, device: torch.device, seed: int) -> torch.nn.Module:
        if self.weights is not None:
            return ModelFile(self.weights).build(self.model, seed).to(device)
        module = compiler.build_module(self.model, seed=seed)
        if self.torchvision_weights:
            load_torchvision_weights(module, self.model, self.torchvision_weights)
        if self.torchvision_state:
            from ..torchvision_state import load_torchvision_state

            load_torchvision_state(module, self.model, self.torchvision_state)
        return module.to(device)


def load_torchvision_weights(module: torch.nn.Module, model: Model, weights_name: str) -> None:
    """Torchvision's named pretrained weights (downloaded and cached by torchvision), minus a
    classifier whose class count differs from the data's: that layer keeps its fresh init."""
    import torchvision

    arch = model.root.attrs.get("name")
    if model.root.op != "torchvision":
        raise compiler.NcError(f"torchvision_weights needs a spec that is a torchvision model, not `{model.name}`")
    enum = torchvision.models.get_model_weights(arch)
    state = enum[weights_name].get_state_dict(progress=False)
    own = module.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(keep, strict=False)


@dataclass
class RunContext:
    recipe: Recipe
    run: RunDir
    listing: Listing
    input_shape: tuple
    device: torch.device
    models: dict[str, ModelSlot]
    rank: int = 0
    world: int = 1
    _data: Data | None = field(default=None, repr=False)
    pipelines: dict = field(default_factory=dict, repr=False)  # train / eval, built on first use unless given
    _placed: dict = field(default_factory=dict, repr=False)
    speed: Speed | None = None
    on_epoch: object = None  # callable(step label, epoch row), e.g. a study's early stopping; may raise to stop

    def __post_init__(self):
        if self.speed is None:
            self.speed = resolve(self.recipe.speed, self.device, ddp=distributed.active())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def interactive(self) -> bool:
        return self.is_main and sys.stderr.isatty() and not os.environ.get("CI")

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def data(self) -> Data:
        if self._data is None:
            self._data = load(self.listing, self.recipe.data, self.input_shape, self.recipe.seed)
            d = self._data
            self.log(f"data: {d.description}: {len(d.train)} train / {len(d.val)} val images"
                     + (f" / {len(d.test)} test" if d.test is not None else "")
                     + f", {len(d.classes)} classes, decoded once to {tuple(d.train.images.shape[1:])} uint8")
        return self._data

    def pipeline(self, which: str) -> Pipeline:
        """The `train` or `eval` transforms, for images of the training input size."""
        if which not in self.pipelines:
            self.pipelines[which] = pipeline_for(self.recipe, which, self.input_shape, self.listing)
        return self.pipelines[which]

    def placed(self, split: str) -> Placed:
        """A split of the data (train, val, test) placed for the run's device, once."""
        if split not in self._placed:
            self._placed[split] = Placed(getattr(self.data(), split), self.device, self.speed.data_on_device)
            if split == "train":
                self.log(f"data: training images in {self._placed[split].where}; {self.speed.describe()}")
        return self._placed[split]

    def evaluate(self, module: torch.nn.Module, split: str = "val"):
        """Accuracy, loss and confusion matrix of `module` on a split, shared out over the ranks."""
        return score(module, self.placed(split), self.pipeline("eval"), self.speed,
                     self.recipe.data.eval_batch_size, len(self.data().classes), self.rank, self.world)

    def calibration(self, images: int) -> list[torch.Tensor]:
        """`images` training images (a seeded draw) as eval-transformed batches on the device."""
        train = self.placed("train")
        gen = torch.Generator().manual_seed(self.recipe.seed)
        idx = torch.randperm(len(train), generator=gen)[:images].sort().values
        bs, tf = self.recipe.data.eval_batch_size, self.pipeline("eval")
        return [tf(train.images_at(idx[i:i + bs]).to(self.device), channels_last=self.speed.channels_last)
                for i in range(0, len(idx), bs)]

    def logits(self, module: torch.nn.Module, split: str, which: str = "eval") -> torch.Tensor:
        """Logits of every image of a split, in order, on the device (every rank computes all)."""
        return logits_of(module, self.placed(split), self.pipeline(which), self.speed,
                         self.recipe.data.eval_batch_size)

    def save(self, slot: ModelSlot, module: torch.nn.Module, step: str, fmt="fp32",
             model: Model | None = None) -> tuple[Path, int]:
        """Write a step's model file (rank 0) and return (path, bytes); the size is the predicted one.

        `model` is the architecture the file describes when a step changed it (prune, lowrank).
        """
        model = model or slot.model
        path = self.run.step_dir(step) / "model.safetensors"
        if self.is_main:
            size = save_model(unwrap(module), model, path, fmt)
            if size != predicted_bytes(model, fmt):  # the compiler's promise; a mismatch is a bug
                raise AssertionError(f"{path}: {size} bytes written, {predicted_bytes(model, fmt)} predicted")
        if distributed.active():
            torch.distributed.barrier()
        return path, predicted_bytes(model, fmt)


def pipeline_for(recipe: Recipe, which: str, input_shape: tuple, listing: Listing) -> Pipeline:
    """The recipe's transforms for the training input. Flips are left out (and the pipeline says so)
    for data that is not mirror-symmetric, such as digits: a mirrored 3 is no 3."""
    size = tuple(input_shape[1:])
    specs = getattr(recipe.transforms, which)
    leave_out = frozenset() if listing.mirror_symmetric else frozenset({"flip"})
    pipeline = Pipeline(specs, f"transforms.{which}", input_shape[0], size, expect=size, leave_out=leave_out)
    dropped = [t for t in specs if isinstance(t, dict) and set(t) & leave_out]
    if dropped:
        pipeline.note = f"flip left out: {listing.description} is not mirror-symmetric"
    return pipeline
