"""Data: find the images, decode every image once, keep the decoded uint8 tensors in memory.

Sources:
  * ImageFolder trees:  PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg
  * food-11 (the course): PATH/training/<label>_<index>.jpg, PATH/validation/..., PATH/testing/*.jpg
  * torchvision datasets by name (CIFAR10, MNIST, ...), with root and a download flag
  * the embedded default: scikit-learn's bundled digits (1,797 real 8x8 images, 10 classes)

On a CPU, decoding JPEGs every epoch costs more than training the small student, so
images are decoded (and resized to the training size) exactly once, in `load`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.errors import NcError
from compiler.limits import limit

from .recipe import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PILLOW_ONLY = (".bmp", ".tif", ".tiff")  # torchvision's decoders do not read these; Pillow does
MAX_LABEL = 100_000                      # food-11 style labels are class indices, not arbitrary numbers
DIGITS = 1797                            # scikit-learn's digits, all decoded (and a split copied) before any limit


# what a model's input channels mean for images: (Pillow's mode, torchvision's ImageReadMode); other
# channel counts take no images
IMAGE_MODES = {1: ("L", "GRAY"), 2: ("LA", "GRAY_ALPHA"), 3: ("RGB", "RGB"), 4: ("RGBA", "RGB_ALPHA")}


def _pillow_decode(raw: bytes, channels: int) -> torch.Tensor:
    import io

    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(io.BytesIO(raw)) as img:  # Pillow refuses decompression bombs
        return F.pil_to_tensor(img.convert(IMAGE_MODES[channels][0]))


class DataError(NcError):
    """Missing folders, empty classes, unreadable images: always naming the path."""


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


@dataclass
class Listing:
    """What a source holds, found without decoding anything (cheap; used for validation and hashing)."""

    source: str                                 # folder-imagefolder | folder-food11 | torchvision | digits
    classes: list[str]
    files: dict[str, list[tuple[Path, int | None]]] = field(default_factory=dict)  # split -> (path, label)
    fingerprint: str = ""
    description: str = ""
    mirror_symmetric: bool = True               # False: a mirrored image is another class's shape (digits)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _fingerprint(files: dict[str, list[tuple[Path, int | None]]]) -> str:
    h = hashlib.sha256()
    for split in sorted(files):
        for path, label in files[split]:
            st = path.stat()
            h.update(f"{split}|{path.name}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _limit(items: list[tuple[Path, int | None]], per_class: int | None):
    if per_class is None:
        return items
    seen: dict = {}
    out = []
    for path, label in items:
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            out.append((path, label))
    return out


def list_folder(root: Path, cfg: DataConfig) -> Listing:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    if (root / "train").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{root / 'train'} has no class folders (expected train/<class>/*.jpg)")
        files = {}
        for split in ("train", "val"):
            folder = root / split
            if not folder.is_dir():
                raise DataError(f"{folder} is missing: an ImageFolder tree needs train/ and val/")
            items = []
            for i, c in enumerate(classes):
                class_dir = folder / c
                images = _images_in(class_dir) if class_dir.is_dir() else []
                if not images:
                    raise DataError(f"class folder {class_dir} is empty (no image files)")
                items += [(p, i) for p in images]
            extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
            if extra:
                raise DataError(f"{folder} has classes that train/ lacks: {', '.join(extra)}")
            files[split] = _limit(items, cfg.limit_per_class)
        return Listing("folder-imagefolder", classes, files, _fingerprint(files), f"ImageFolder {root}")
    if (root / "training").is_dir():
        files = {}
        labels = set()
        for split, name in (("train", "training"), ("val", "validation")):
            folder = root / name
            if not folder.is_dir():
                raise DataError(f"{folder} is missing: the food-11 layout needs training/ and validation/")
            items = []
            for p in _images_in(folder):
                head = p.stem.split("_", 1)[0]
                if not head.isdigit():
                    raise DataError(f"{p}: expected a name like <label>_<index>{p.suffix} in the food-11 layout")
                if int(head) >= MAX_LABEL:
                    raise DataError(f"{p}: label {int(head)} is not a class index (labels are 0, 1, ... N-1)")
                items.append((p, int(head)))
                labels.add(int(head))
            if not items:
                raise DataError(f"{folder} has no images")
            files[split] = _limit(items, cfg.limit_per_class)
        if (root / "testing").is_dir():
            files["test"] = [(p, None) for p in _images_in(root / "testing")]
        n = max(labels) + 1
        missing = sorted(set(range(n)) - labels)
        if missing:
            raise DataError(f"{root / 'training'}: no images for class(es) {missing}")
        return Listing("folder-food11", [str(i) for i in range(n)], files, _fingerprint(files), f"food-11 {root}")
    split = root.resolve().name in ("train", "val", "training", "validation", "testing")
    raise DataError(
        f"{root}: unknown data layout; expected train/<class>/ and val/<class>/ (ImageFolder) "
        f"or training/<label>_<index>.jpg and validation/ (food-11)"
        + (f"\n  hint: this is one split of a data set; give the folder above it, {root.resolve().parent}"
           if split else ""))


def _digits_file() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("the embedded default data (scikit-learn's digits) needs scikit-learn: "
                        "pip install scikit-learn")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def list_source(cfg: DataConfig) -> Listing:
    """What the configured source holds, without decoding; a single class is an error unless allowed."""
    listing = _list_source(cfg)
    if len(listing.classes) < 2 and not cfg.allow_single_class:
        raise DataError(f"{listing.description} has {len(listing.classes)} class(es): a classifier needs two or "
                        "more\n  hint: add class folders, or set data.allow_single_class: true if you mean it")
    return listing


def _list_source(cfg: DataConfig) -> Listing:
    source = cfg.source
    if source == "auto":
        source = "folder" if cfg.path else ("torchvision" if cfg.name else "digits")
    if source == "folder":
        if not cfg.path:
            raise DataError("data.source is `folder` but no path is given (use --data PATH)")
        return list_folder(Path(cfg.path), cfg)
    if source == "digits":
        return Listing("digits", [str(i) for i in range(10)], {}, f"digits-sklearn-{DIGITS}",
                       f"scikit-learn digits ({DIGITS:,} 8x8 images)", mirror_symmetric=False)
    if source == "torchvision":
        import torchvision

        cls = getattr(torchvision.datasets, cfg.name, None) if cfg.name and not cfg.name.startswith("_") else None
        if not (isinstance(cls, type) and issubclass(cls, torchvision.datasets.VisionDataset)):
            raise DataError(f"torchvision has no dataset `{cfg.name}`")
        if issubclass(cls, torchvision.datasets.DatasetFolder):
            raise DataError(f"`{cfg.name}` reads image folders: use --data PATH (data.source: folder) instead")
        train = _torchvision_split(cfg, True)
        classes = list(getattr(train, "classes", [])) or sorted({str(int(y)) for y in getattr(train, "targets", [])})
        return Listing("torchvision", classes, {}, f"torchvision-{cfg.name}-{cfg.root}-{len(train)}",
                       f"torchvision {cfg.name}")
    raise AssertionError(source)


# --- decoding ------------------------------------------------------------------

def _decoder_message(err: Exception) -> str:
    """The decoder's reason without the C++ source location torchvision puts before it
    (`decode_png, /__w/vision/.../decode_png.cpp:66, Content is not png!`)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    parts = [p.strip() for p in first.split(", ")]
    kept = [p for p in parts if not re.search(r"\.(cpp|cu|h|hpp):\d+$", p)]
    return ", ".join(kept) if len(kept) < len(parts) else first


def _decoded_chunks(items, size: tuple[int, int], channels: int, on_bad: str, skipped: list[str], chunk: int = 512):
    """Decode files in chunks of `chunk`: yields (uint8 [k, C, H, W], labels, ids); JPEGs go through
    torchvision's batched decoder, other formats and bad files one by one."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    mode = ImageReadMode[IMAGE_MODES[channels][1]]

    def read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot read image ({err.strerror})") from None

    def tensor(raw: bytes) -> torch.Tensor:  # torchvision's decoders read uint8 tensors
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)

    def one(path: Path, raw: bytes):
        try:
            if not raw:
                raise ValueError("the file is empty")
            if path.suffix.lower() in PILLOW_ONLY:
                return _pillow_decode(raw, channels)
            img = decode_image(tensor(raw), mode=mode)
            # 16-bit PNGs decode to uint16: scale to 8 bits like every other image
            return img if img.dtype == torch.uint8 else F.to_dtype(img, torch.uint8, scale=True)
        except (RuntimeError, ValueError, OSError) as err:
            if on_bad == "error":
                raise DataError(f"{path}: cannot decode image ({_decoder_message(err)})\n"
                                "  hint: fix or remove the file, or set data.on_bad_image: skip "
                                "(--set data.on_bad_image=skip) to skip and count such files") from None
            skipped.append(str(path))
            return None

    max_pixels = limit("image_pixels")

    def too_large(path: Path, raw: bytes) -> bool:
        """Width x height from the header (Pillow reads no pixels for it) over the limit."""
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(raw)) as img:  # BytesIO shares the bytes, no copy
                w, h = img.size
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return False  # not for Pillow to judge; the decoder reports it
        if w * h <= max_pixels:
            return False
        if on_bad == "error":
            raise DataError(f"{path}: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}\n"
                            "  hint: resize it, raise NCCOMPILE_LIMIT_IMAGE_PIXELS, or set data.on_bad_image: skip")
        skipped.append(str(path))
        return True

    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        raws = [read(path) for path, _ in part]
        keep = [i for i, ((path, _), r) in enumerate(zip(part, raws)) if not (r and too_large(path, r))]
        part, datas = [part[i] for i in keep], [raws[i] for i in keep]
        if not part:
            continue
        jpeg = all(p.suffix.lower() in (".jpg", ".jpeg") for p, _ in part) and all(datas)
        try:
            decoded = (decode_jpeg([tensor(r) for r in datas], mode=mode) if jpeg
                       else [one(p, d) for (p, _), d in zip(part, datas)])
        except RuntimeError:  # a bad file in the batch: find it one by one
            decoded = [one(p, d) for (p, _), d in zip(part, datas)]
        images, labels, ids = [], [], []
        for (path, label), img in zip(part, decoded):
            if img is None:
                continue
            if tuple(img.shape[1:]) != size:
                img = F.resize(img, list(size), antialias=True)
            images.append(img)
            labels.append(label)
            ids.append(path.stem)
        if images:
            yield torch.stack(images), labels, ids


def _decode_files(items, size: tuple[int, int], channels: int, on_bad: str, skipped: list[str]) -> Split:
    """Decode files into one uint8 tensor in memory."""
    images, labels, ids = [], [], []
    for chunk_images, chunk_labels, chunk_ids in _decoded_chunks(items, size, channels, on_bad, skipped):
        images.append(chunk_images)
        labels += chunk_labels
        ids += chunk_ids
    if not images:
        return Split(torch.empty((0, channels, *size), dtype=torch.uint8), None, [])
    lab = None if labels[0] is None else torch.tensor(labels, dtype=torch.int64)
    return Split(torch.cat(images), lab, ids)


def _to_shape(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, c, h, w] -> [N, channels, H, W], resizing the whole batch at once."""
    from torchvision.transforms.v2 import functional as F

    have = images.shape[1]
    if have != channels:  # gray <-> RGB as torchvision converts; an alpha channel is added opaque, or dropped
        color = images[:, :3] if have >= 3 else images[:, :1]  # gray or RGB, without alpha
        if (channels >= 3) != (color.shape[1] == 3):
            color = color.expand(-1, 3, -1, -1) if channels >= 3 else F.rgb_to_grayscale(color)
        alpha = images[:, -1:] if have in (2, 4) else torch.full_like(images[:, :1], 255)
        images = torch.cat([color, alpha], 1) if channels in (2, 4) else color.contiguous()
    if tuple(images.shape[2:]) != size:
        images = F.resize(images, list(size), antialias=True)
    return images


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
    """The first `per_class` of `idx` in each class, in order (data.limit_per_class, as `_limit` for files)."""
    if per_class is None:
        return idx
    kept = [idx[labels[idx] == c][:per_class] for c in labels[idx].unique().tolist()]
    return torch.cat(kept).sort().values if kept else idx


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
                    _decoded_chunks(items, size, channels, cfg.on_bad_image, out)), len(items))
                splits[name] = Split(images, labels, ids)
                skipped += bad
            else:
                splits[name] = _decode_files(items, size, channels, cfg.on_bad_image, skipped)
        if skipped:
            print(f"data: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
        return Data(listing.classes, splits["train"], splits["val"], splits.get("test"), skipped, listing.description)
    if listing.source == "digits":
        import numpy as np

        raw = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32)
        pixels = torch.from_numpy(raw[:, :64]).reshape(-1, 1, 8, 8)
        images = (pixels * (255 / 16)).round().clamp(0, 255).to(torch.uint8)
        labels = torch.from_numpy(raw[:, 64]).to(torch.int64)
        images = _to_shape(images, channels, size)
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


def _torchvision_split(cfg: DataConfig, train: bool):
    import torchvision

    cls = getattr(torchvision.datasets, cfg.name)
    root = cfg.root or "data"
    try:
        try:
            return cls(root, train=train, download=cfg.download)
        except TypeError:
            return cls(root, split="train" if train else "test", download=cfg.download)
    except TypeError:
        raise DataError(f"torchvision {cfg.name} has neither a `train` flag nor a train/test `split`; "
                        "nccompile cannot tell its training images from its test images") from None
    except (RuntimeError, ValueError, OSError) as err:
        raise DataError(f"torchvision {cfg.name} at {root}: {err}"
                        + ("" if cfg.download else " (set data.download: true to download it)")) from None


def _load_torchvision(listing: Listing, cfg: DataConfig, channels: int, size, seed: int) -> Data:
    from torchvision.transforms.v2 import functional as F

    def split(train: bool):
        ds = _torchvision_split(cfg, train)
        targets = getattr(ds, "targets", None)  # most datasets hold their labels: no decoding to read them
        all_labels = torch.tensor([int(y) for y in targets] if targets is not None else [int(y) for _, y in ds])
        keep = _first_per_class(torch.arange(len(all_labels)), all_labels, cfg.limit_per_class).tolist()
        labels = all_labels[keep]
        images = [ds[i][0] for i in keep]
        images = [F.pil_to_tensor(img) if not isinstance(img, torch.Tensor) else img for img in images]
        images = torch.stack([_to_shape(i.unsqueeze(0), channels, size)[0] for i in images])
        classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(int(labels.max()) + 1)]
        return images, labels, classes

    tr_images, tr_labels, classes = split(True)
    va_images, va_labels, _ = split(False)
    ids = lambda n: [str(i) for i in range(n)]  # noqa: E731
    return Data(classes, Split(tr_images, tr_labels, ids(len(tr_labels))),
                Split(va_images, va_labels, ids(len(va_labels))), description=listing.description)
