"""Decoding image files into uint8 tensors at the training size: JPEGs in batches by torchvision,
other formats one by one (Pillow for the ones torchvision does not read), each checked against the
image pixel limit from its header before any pixel is decoded."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from compiler.limits import limit

from .sources import DataError

PILLOW_ONLY = (".bmp", ".tif", ".tiff")  # torchvision's decoders do not read these; Pillow does


# what a model's input channels mean for images: (Pillow's mode, torchvision's ImageReadMode); other
# channel counts take no images
IMAGE_MODES = {1: ("L", "GRAY"), 2: ("LA", "GRAY_ALPHA"), 3: ("RGB", "RGB"), 4: ("RGBA", "RGB_ALPHA")}


def _pillow_decode(raw: bytes, channels: int) -> torch.Tensor:
    import io

    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(io.BytesIO(raw)) as img:  # Pillow refuses decompression bombs
        return F.pil_to_tensor(img.convert(IMAGE_MODES[channels][0]))


def _decoder_message(err: Exception) -> str:
    """The decoder's reason without the C++ source location torchvision puts before it
    (`decode_png, /__w/vision/.../decode_png.cpp:66, Content is not png!`)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    parts = [p.strip() for p in first.split(", ")]
    kept = [p for p in parts if not re.search(r"\.(cpp|cu|h|hpp):\d+$", p)]
    return ", ".join(kept) if len(kept) < len(parts) else first


def decoded_chunks(items, size: tuple[int, int], channels: int, on_bad: str, skipped: list[str], chunk: int = 512):
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
                img = resize(img, size)
            images.append(img)
            labels.append(label)
            ids.append(path.stem)
        if images:
            yield torch.stack(images), labels, ids


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images resized with antialiasing. To 1x1 through float: PyTorch's uint8 antialiasing
    kernel fails an internal assert there (torch 2.11-2.14, CPU; `--input 3x1x1` was an internal error)."""
    from torchvision.transforms.v2 import functional as F

    if tuple(size) != (1, 1) or images.dtype != torch.uint8:
        return F.resize(images, list(size), antialias=True)
    return F.resize(images.float(), [1, 1], antialias=True).round_().clamp_(0, 255).to(torch.uint8)


def to_shape(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
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
        images = resize(images, size)
    return images
