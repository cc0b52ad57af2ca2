"""Loading a listed source: every image decoded once, at the training size, into uint8 tensors
(in memory, or memory-mapped from the cache: runtime.data.cache), split into train / val (/ test)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from compiler.limits import limit

from ..recipe import DataConfig
from .decode import IMAGE_MODES, decoded_chunks, to_shape
from .sources import DIGITS, DataError, Listing, digits_file, first_per_class, torchvision_split


@dataclass
class Split:
    images: torch.Tensor            # uint8 [N, C, H, W]
    labels: torch.Tensor | None     # int64 [N]; None for an unlabeled split
    ids: list[str]                  # file stems or indices, for predictions

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Data:
    classes: list[str]
    train: Split
    val: Split
    test: Split | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable images skipped (on_bad_image: skip)
    description: str = ""


def _decode_files(items, size: tuple[int, int], channels: int, on_bad: str, skipped: list[str]) -> Split:
    """Decode files into one uint8 tensor in memory."""
    images, labels, ids = [], [], []
    for chunk_images, chunk_labels, chunk_ids in decoded_chunks(items, size, channels, on_bad, skipped):
        images.append(chunk_images)
        labels += chunk_labels
        ids += chunk_ids
    if not images:
        return Split(torch.empty((0, channels, *size), dtype=torch.uint8), None, [])
    lab = None if labels[0] is None else torch.tensor(labels, dtype=torch.int64)
    return Split(torch.cat(images), lab, ids)


def _split(n: int, labels: torch.Tensor, fraction: float, seed: int):
    """A stratified train/val split of range(n), the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(len(idx) * fraction))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _first_per_class(idx: torch.Tensor, labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """The indices `idx` limited as image files are (sources.first_per_class)."""
    if per_class is None:
        return idx
    kept = first_per_class(list(zip(idx.tolist(), labels[idx].tolist())), per_class)
    return torch.tensor([i for i, _ in kept], dtype=idx.dtype)


def check_decodable(listing: Listing, cfg: DataConfig, input_shape: tuple[int, int, int]) -> None:
    """The images can be decoded for this training input, found before any work: a size within the
    image pixel limit, the machine's memory for images held in memory (digits, image folders without
    the cache), and channels that images have."""
    c, h, w = input_shape
    if h * w > limit("image_pixels"):  # every image is decoded to this size
        raise DataError(f"the training input {c}x{h}x{w} is over the limit of {limit('image_pixels'):,} pixels an "
                        "image may have\n  hint: a smaller --input (or NCCOMPILE_LIMIT_IMAGE_PIXELS)")
    check_memory(listing, cfg, input_shape)
    if c not in IMAGE_MODES:
        raise DataError(f"the model's input has {c} channels, and images have 1 (gray), 2 (gray and alpha), "
                        "3 (RGB) or 4 (RGB and alpha)\n  hint: give the spec, or --input, one of those")


def check_memory(listing: Listing, cfg: DataConfig, input_shape: tuple[int, int, int]) -> None:
    """Images held in memory must fit this machine's memory. The cache maps a file (larger than memory
    is fine), and a torchvision data set's size is known only once it is read."""
    if listing.source == "digits":
        count = 2 * DIGITS
    elif listing.source.startswith("folder") and not cfg.cache:
        count = sum(len(items) for items in listing.files.values())
    else:
        return
    need = count * math.prod(input_shape)
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every system says
        return
    if need > have:
        raise DataError(f"{listing.description} at {'x'.join(map(str, input_shape))} takes {need / 1e9:,.1f} GB "
                        f"decoded, more than this machine's {have / 1e9:,.1f} GB of memory\n  hint: a smaller "
                        "--input" + ("" if listing.source == "digits" else
                                     ", data.limit_per_class, or data.cache: true (it trains from disk pages)"))


def load(listing: Listing, cfg: DataConfig, input_shape: tuple[int, int, int], seed: int) -> Data:
    channels, size = input_shape[0], tuple(input_shape[1:])
    skipped: list[str] = []
    if listing.source.startswith("folder"):
        from .cache import cache_folder, cached_split

        folder = cache_folder(cfg) if cfg.cache else None
        splits = {}
        for name, items in listing.files.items():
            if folder is not None:
                key = (listing.fingerprint, name, size, channels, cfg.on_bad_image)
                images, labels, ids, bad = cached_split(folder, key, (channels, *size), lambda out, items=items: (
                    decoded_chunks(items, size, channels, cfg.on_bad_image, out)), len(items))
                splits[name] = Split(images, labels, ids)
                skipped += bad
            else:
                splits[name] = _decode_files(items, size, channels, cfg.on_bad_image, skipped)
        if skipped:
            print(f"data: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
        return Data(listing.classes, splits["train"], splits["val"], splits.get("test"), skipped, listing.description)
    if listing.source == "digits":
        import numpy as np

        raw = np.loadtxt(digits_file(), delimiter=",", dtype=np.float32)
        pixels = torch.from_numpy(raw[:, :64]).reshape(-1, 1, 8, 8)
        images = (pixels * (255 / 16)).round().clamp(0, 255).to(torch.uint8)
        labels = torch.from_numpy(raw[:, 64]).to(torch.int64)
        images = to_shape(images, channels, size)
        tr, va = _split(len(labels), labels, cfg.val_fraction, seed)
        if len(tr) == 0:
            raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training images\n"
                            "  hint: use a smaller fraction, such as 0.2")
        tr, va = _first_per_class(tr, labels, cfg.limit_per_class), _first_per_class(va, labels, cfg.limit_per_class)
        ids = [str(i) for i in range(len(labels))]
        return Data(listing.classes, Split(images[tr], labels[tr], [ids[i] for i in tr]),
                    Split(images[va], labels[va], [ids[i] for i in va]), description=listing.description)
    if listing.source == "torchvision":
        return _load_torchvision(listing, cfg, channels, size, seed)
    raise AssertionError(listing.source)


def _load_torchvision(listing: Listing, cfg: DataConfig, channels: int, size, seed: int) -> Data:
    from torchvision.transforms.v2 import functional as F

    def split(train: bool):
        ds = torchvision_split(cfg, train)
        targets = getattr(ds, "targets", None)  # most datasets hold their labels: no decoding to read them
        all_labels = torch.tensor([int(y) for y in targets] if targets is not None else [int(y) for _, y in ds])
        keep = _first_per_class(torch.arange(len(all_labels)), all_labels, cfg.limit_per_class).tolist()
        labels = all_labels[keep]
        images = [ds[i][0] for i in keep]
        images = [F.pil_to_tensor(img) if not isinstance(img, torch.Tensor) else img for img in images]
        images = torch.stack([to_shape(i.unsqueeze(0), channels, size)[0] for i in images])
        classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(int(labels.max()) + 1)]
        return images, labels, classes

    tr_images, tr_labels, classes = split(True)
    va_images, va_labels, _ = split(False)
    ids = lambda n: [str(i) for i in range(n)]  # noqa: E731
    return Data(classes, Split(tr_images, tr_labels, ids(len(tr_labels))),
                Split(va_images, va_labels, ids(len(va_labels))), description=listing.description)
