"""Recipe transforms -> torchvision.transforms.v2, applied to decoded uint8 tensors.

Each transform is a one-key mapping: `{flip: 0.5}`, `{crop: {size: 32, padding: 4}}`,
`{rotation: 15}`, `{resize: 32}`, `{center_crop: 28}`, `{color_jitter: {brightness: 0.2}}`,
`{normalize: {mean: [...], std: [...]}}`. Images become float in [0, 1] before
`normalize`. Random transforms run per sample; a pipeline with none runs on whole
batches at once.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from compiler.errors import did_you_mean

from .recipe import RecipeError


def _size(v):
    return [v, v] if isinstance(v, int) else list(v)


_BUILDERS = {
    "flip": (True, lambda a: v2.RandomHorizontalFlip(a if isinstance(a, (int, float)) else 0.5)),
    "vflip": (True, lambda a: v2.RandomVerticalFlip(a if isinstance(a, (int, float)) else 0.5)),
    "rotation": (True, lambda a: v2.RandomRotation(a)),
    "crop": (True, lambda a: v2.RandomCrop(_size(a["size"]), padding=a.get("padding"))
             if isinstance(a, dict) else v2.RandomCrop(_size(a))),
    "resized_crop": (True, lambda a: v2.RandomResizedCrop(_size(a["size"] if isinstance(a, dict) else a),
                                                          antialias=True)),
    "color_jitter": (True, lambda a: v2.ColorJitter(**a)),
    "resize": (False, lambda a: v2.Resize(_size(a), antialias=True)),
    "center_crop": (False, lambda a: v2.CenterCrop(_size(a))),
    "normalize": (False, lambda a: v2.Normalize(a["mean"], a["std"])),
}


class Pipeline:
    """uint8 batch [N, C, H, W] -> float batch, through the recipe's transforms."""

    def __init__(self, specs: list[dict], where: str):
        before, after, problems = [], [], []
        self.random = False
        for i, item in enumerate(specs):
            if not isinstance(item, dict) or len(item) != 1:
                problems.append(f"`{where}[{i}]`: a transform is a one-key mapping such as {{flip: 0.5}}")
                continue
            (name, arg), = item.items()
            if name not in _BUILDERS:
                hint = did_you_mean(name, _BUILDERS)
                problems.append(f"`{where}[{i}]`: unknown transform `{name}`" + (f"; {hint}" if hint else "")
                                + f" (known: {', '.join(_BUILDERS)})")
                continue
            random, build = _BUILDERS[name]
            try:
                t = build(arg)
            except (TypeError, KeyError, ValueError) as err:
                problems.append(f"`{where}[{i}]`: bad arguments for `{name}`: {err}")
                continue
            self.random |= random
            (after if name == "normalize" else before).append(t)
        if problems:
            raise RecipeError("transforms", problems)
        self.before = v2.Compose(before) if before else None
        self.after = v2.Compose(after) if after else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.before is not None:
            if self.random:  # independent random parameters for every sample
                batch = torch.stack([self.before(img) for img in batch])
            else:
                batch = self.before(batch)
        batch = batch.float().div_(255)
        return self.after(batch) if self.after is not None else batch
