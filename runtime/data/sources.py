"""Where the images are: a data source listed without decoding anything (cheap; used for validation
and for the cache's key).

  * ImageFolder trees:  PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg
  * food-11 (the course): PATH/training/<label>_<index>.jpg, PATH/validation/..., PATH/testing/*.jpg
  * torchvision datasets by name (CIFAR10, MNIST, ...), with root and a download flag
  * the embedded default: scikit-learn's bundled digits (1,797 real 8x8 images, 10 classes)
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from compiler.errors import NcError

from ..recipe import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_LABEL = 100_000                      # food-11 style labels are class indices, not arbitrary numbers
DIGITS = 1797                            # scikit-learn's digits, all decoded (and a split copied) before any limit


class DataError(NcError):
    """Missing folders, empty classes, unreadable images: always naming the path."""


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


def first_per_class(items: list[tuple], per_class: int | None) -> list[tuple]:
    """The first `per_class` (item, label) pairs of each label, in order (data.limit_per_class)."""
    if per_class is None:
        return items
    seen: dict = {}
    out = []
    for item, label in items:
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            out.append((item, label))
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
            files[split] = first_per_class(items, cfg.limit_per_class)
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
            files[split] = first_per_class(items, cfg.limit_per_class)
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


def digits_file() -> Path:
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
        train = torchvision_split(cfg, True)
        classes = list(getattr(train, "classes", [])) or sorted({str(int(y)) for y in getattr(train, "targets", [])})
        return Listing("torchvision", classes, {}, f"torchvision-{cfg.name}-{cfg.root}-{len(train)}",
                       f"torchvision {cfg.name}")
    raise AssertionError(source)


def torchvision_split(cfg: DataConfig, train: bool):
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
