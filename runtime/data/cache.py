"""Decoded images in memory-mapped files: decode a folder once, ever, not once per run.

A split's decoded uint8 images are one raw file `<key>.u8` ([N, C, H, W], C-order) in the
cache folder, with `<key>.json` beside it (shape, labels, ids, skipped files). The key hashes
the source's file list (names, sizes, modification times), the split, the decoded size and
channels, so changing any image, the subset or the training input gives a new entry.
Reading maps the file (copy-on-write): pages load on first touch, so a data set larger
than the machine's memory trains from disk pages. Entries are written to a temporary file
and renamed, so a killed run never leaves a half-written entry behind.

Folder: data.cache_dir, else $NCCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/nccompile, else
~/.cache/nccompile. Delete the folder at any time to reclaim the space.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..files import atomic_write
from ..recipe import DataConfig
from ..rundir import digest

FORMAT = "nccompile-decoded-v2"  # v2: 2 and 4 channels are gray+alpha and RGBA (v1: gray copies)


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # rank 0 speaks for all under torchrun
        print(message, flush=True)


def cache_folder(cfg: DataConfig) -> Path | None:
    """The cache folder, created if needed; None (decode in memory) when it cannot be written."""
    folder = cfg.cache_dir or os.environ.get("NCCOMPILE_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(base) / "nccompile")
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path if os.access(path, os.W_OK) else None
    except OSError:
        return None


def _open(raw: Path, shape: tuple) -> torch.Tensor:
    if shape[0] == 0:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.from_file(str(raw), shared=False, size=math.prod(shape), dtype=torch.uint8).view(shape)


Entry = tuple  # (uint8 images [N, C, H, W], int64 labels or None, ids, skipped files)


def _read(folder: Path, key: str) -> Entry | None:
    meta_path, raw = folder / f"{key}.json", folder / f"{key}.u8"
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(meta["shape"])
        if meta.get("format") != FORMAT or raw.stat().st_size != math.prod(shape):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    labels = None if meta["labels"] is None else torch.tensor(meta["labels"], dtype=torch.int64)
    return _open(raw, shape), labels, meta["ids"], meta["skipped"]


def cached_split(folder: Path, key_parts, image_shape: tuple, decode: Callable[[list], Iterator], n_max: int
                 ) -> Entry:
    """The split from the cache, or decoded (streamed chunk by chunk into the mapped file) and cached."""
    key = digest(FORMAT, *key_parts)
    found = _read(folder, key)
    if found is not None:
        _say(f"data: {found[0].shape[0]:,} decoded images from the cache {folder / key}.u8 (no decoding)")
        return found
    per = math.prod(image_shape)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
    skipped: list[str] = []
    labels: list = []
    ids: list[str] = []
    try:
        with os.fdopen(fd, "r+b") as f:
            f.truncate(n_max * per)
        n = 0
        if n_max:
            out = torch.from_file(tmp, shared=True, size=n_max * per, dtype=torch.uint8).view(n_max, *image_shape)
            for images, chunk_labels, chunk_ids in decode(skipped):
                out[n:n + len(images)] = images
                n += len(images)
                labels += chunk_labels
                ids += chunk_ids
            del out
        os.truncate(tmp, n * per)  # skipped files leave room at the end
        os.replace(tmp, folder / f"{key}.u8")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"format": FORMAT, "shape": [n, *image_shape], "labels": None if not labels or labels[0] is None
            else labels, "ids": ids, "skipped": skipped}
    atomic_write(folder / f"{key}.json", json.dumps(meta).encode())
    _say(f"data: decoded {n:,} images into the cache {folder / key}.u8")
    found = _read(folder, key)
    assert found is not None, "a cache entry that was just written cannot be read"
    return found
