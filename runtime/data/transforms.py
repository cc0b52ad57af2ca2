"""Recipe transforms, applied to whole uint8 batches on the batch's device.

Each transform is a one-key mapping: `{flip: 0.5}`, `{crop: {padding: 4}}`, `{rotation: 15}`,
`{resized_crop: {scale: [0.35, 1]}}`, `{color_jitter: {brightness: 0.2}}`, `{resize: 40}`,
`{center_crop: 28}`, `{normalize: {mean: [...], std: [...]}}`.

Random transforms draw independent parameters for every sample and apply them to the
whole batch in a few tensor operations: no Python loop over samples, so they run on the
GPU next to the model (the airbench way). A transform that takes a size defaults to the
size of the images it receives, which is the training input, so no recipe names a pixel
size. Converting to float, scaling to [0, 1] and normalizing are one affine pass at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compiler.errors import did_you_mean
from compiler.limits import limit

from ..recipe import RecipeError, yaml_float

Size = tuple[int, int]


def _pair(v, what: str) -> Size:
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, (list, tuple)) and len(v) == 2)):
        raise ValueError(f"{what} must be an integer or [height, width], got {v!r}")
    h, w = (v, v) if isinstance(v, int) else v
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (h, w)):
        raise ValueError(f"{what} must be positive integers, got {v!r}")
    return int(h), int(w)


def _range(v, what: str, lo: float | None = None) -> tuple[float, float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        a, b = float(v), float(v)
    elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        a, b = map(float, v)
    else:
        raise ValueError(f"{what} must be a number or [low, high], got {v!r}")
    if a > b or (lo is not None and a < lo):
        raise ValueError(f"{what} must be an increasing range" + (f" within [{lo}, ...)" if lo is not None else "")
                         + f", got {v!r}")
    return a, b


def _args(arg, allowed: dict, name: str) -> dict:
    """A transform's arguments: a mapping with known keys (defaults filled in)."""
    if not isinstance(arg, dict):
        raise ValueError(f"`{name}` takes a mapping such as {{{', '.join(f'{k}: ...' for k in allowed)}}}")
    unknown = [k for k in arg if k not in allowed]
    if unknown:
        hint = did_you_mean(str(unknown[0]), allowed)
        raise ValueError(f"unknown argument `{unknown[0]}`" + (f"; {hint}" if hint else "")
                         + f" (known: {', '.join(allowed)})")
    return {**allowed, **arg}


def _number_as_text_hint(arg) -> str:
    """YAML 1.1 reads `1e9` (no dot, no exponent sign) as text: say so where a transform refused it."""
    values = arg.values() if isinstance(arg, dict) else arg if isinstance(arg, (list, tuple)) else [arg]
    for v in values:
        if isinstance(v, (list, tuple)):
            v = next((x for x in v if isinstance(x, str)), None)
        if isinstance(v, str):
            try:
                number = float(v)
            except ValueError:
                continue
            if math.isfinite(number):
                return f"\n  hint: YAML reads `{v}` as text; write the number as {yaml_float(number)}"
    return ""


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor, gen) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=like.device) * (hi - lo) + lo


# --- the transforms ------------------------------------------------------------------
# Each one: `random`, `out_size(size)`, `sample(n, size, like, gen)` -> parameters,
# `apply(x, params)`. Splitting sampling from applying lets tests feed the same
# parameters to torchvision's per-image functions.

class Flip:
    random = True
    float_only = False

    def __init__(self, arg, size: Size, dim: int = -1):
        p = 0.5 if arg is None or arg is True else arg
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"takes the probability of flipping, in [0, 1], got {arg!r}")
        self.p, self.dim = float(p), dim

    def out_size(self, size: Size) -> Size:
        return size

    def describe(self) -> str:
        return f"p={self.p:g}"

    def sample(self, n, size, like, gen):
        return torch.rand(n, generator=gen, device=like.device) < self.p

    def apply(self, x, mask):
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(self.dim), x)


class VFlip(Flip):
    def __init__(self, arg, size: Size):
        super().__init__(arg, size, dim=-2)


class Crop:
    """Random crop of `size` (default: the incoming size) after padding every side by `padding`:
    pixels (an integer), or a fraction of the image's shorter side (0.125 pads a 32x32 image by 4)."""

    random = True
    float_only = False

    def __init__(self, arg, size: Size):
        if not isinstance(arg, dict):
            arg = {"size": arg}
        a = _args(arg, {"size": None, "padding": 0, "padding_mode": "constant", "fill": 0}, "crop")
        self.size = None if a["size"] is None else _pair(a["size"], "size")
        pad = a["padding"]
        if isinstance(pad, float) and 0 <= pad < 1:
            pad = round(pad * min(size))
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"padding must be a non-negative integer (pixels) or a fraction in [0, 1) of the "
                             f"image size, got {a['padding']!r}")
        a["padding"] = pad
        if a["padding_mode"] not in ("constant", "reflect", "edge"):
            raise ValueError(f"padding_mode must be constant, reflect or edge, got {a['padding_mode']!r}")
        fill = a["fill"]
        if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
            raise ValueError(f"fill must be a pixel value, an integer in [0, 255], got {fill!r}")
        self.padding, self.mode, self.fill = a["padding"], a["padding_mode"], fill
        h, w = size
        ch, cw = self.out_size(size)
        if ch > h + 2 * self.padding or cw > w + 2 * self.padding:
            raise ValueError(f"a {ch}x{cw} crop does not fit in {h}x{w} images padded by {self.padding}")
        if self.padding >= min(h, w):  # a crop could miss the image entirely (and the padded batch grows as padding²)
            raise ValueError(f"padding of {self.padding} needs images larger than {h}x{w}\n"
                             "  hint: a fraction such as 0.125 pads by that share of the image's side")

    def out_size(self, size: Size) -> Size:
        return self.size or size

    def describe(self) -> str:
        return f"padding={self.padding}" + (f" ({self.mode})" if self.padding and self.mode != "constant" else "")

    def sample(self, n, size, like, gen):
        h, w = size
        ch, cw = self.out_size(size)
        top = torch.randint(0, h + 2 * self.padding - ch + 1, (n,), generator=gen, device=like.device)
        left = torch.randint(0, w + 2 * self.padding - cw + 1, (n,), generator=gen, device=like.device)
        return top, left

    def apply(self, x, params):
        top, left = params
        ch, cw = self.out_size(tuple(x.shape[-2:]))
        p = self.padding
        if p:
            mode = {"edge": "replicate"}.get(self.mode, self.mode)
            fill = self.fill if not x.is_floating_point() else self.fill / 255  # after a float transform: [0, 1]
            x = F.pad(x, (p,) * 4, mode=mode, value=fill) if mode == "constant" else F.pad(x, (p,) * 4, mode=mode)
        n, c = x.shape[:2]
        rows = (top.view(-1, 1) + torch.arange(ch, device=x.device)).view(n, 1, ch, 1)
        cols = (left.view(-1, 1) + torch.arange(cw, device=x.device)).view(n, 1, 1, cw)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return x[batch, chans, rows, cols]


def _affine(x: torch.Tensor, theta: torch.Tensor, out: Size, mode: str) -> torch.Tensor:
    """Sample `x` (float) through per-sample affine maps in normalized coordinates (zeros outside)."""
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *out], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


class Rotation:
    """Random rotation by an angle in [-degrees, degrees] (or [low, high]) about the centre."""

    random = True
    float_only = True

    def __init__(self, arg, size: Size):
        if isinstance(arg, dict):
            a = _args(arg, {"degrees": None, "interpolation": "nearest"}, "rotation")
            arg, self.mode = a["degrees"], a["interpolation"]
            if self.mode not in ("nearest", "bilinear"):
                raise ValueError(f"interpolation must be nearest or bilinear, got {self.mode!r}")
        else:
            self.mode = "nearest"
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            if arg < 0:
                raise ValueError(f"degrees must be non-negative, got {arg!r}")
            arg = [-arg, arg]
        self.degrees = _range(arg, "degrees")
        if not -360 <= self.degrees[0] <= self.degrees[1] <= 360:  # angles drawn in float32: huge ones are inf
            raise ValueError(f"degrees must lie within [-360, 360], got {arg!r}")

    def out_size(self, size: Size) -> Size:
        return size

    def describe(self) -> str:
        return f"degrees={self.degrees[0]:g}..{self.degrees[1]:g}"

    def sample(self, n, size, like, gen):
        return _uniform(n, *self.degrees, like, gen)

    @staticmethod
    def theta(angles: torch.Tensor, size: Size) -> torch.Tensor:
        # Output -> input map of a counter-clockwise rotation (torchvision's convention), in pixel
        # units about the centre, rescaled to the [-1, 1] coordinates of affine_grid.
        h, w = size
        a = torch.deg2rad(angles.float())
        cos, sin = torch.cos(a), torch.sin(a)
        zero = torch.zeros_like(a)
        return torch.stack([torch.stack([cos, -sin * h / w, zero], 1),
                            torch.stack([sin * w / h, cos, zero], 1)], 1)

    def apply(self, x, angles):
        return _affine(x, self.theta(angles, tuple(x.shape[-2:])), tuple(x.shape[-2:]), self.mode)


class ResizedCrop:
    """A random box (area share in `scale`, aspect ratio in `ratio`) resized to `size` (default: incoming)."""

    random = True
    float_only = True

    def __init__(self, arg, size: Size):
        if not isinstance(arg, dict):
            arg = {"size": arg}
        a = _args(arg, {"size": None, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3]}, "resized_crop")
        self.size = None if a["size"] is None else _pair(a["size"], "size")
        self.scale = _range(a["scale"], "scale", 0.0)
        self.ratio = _range(a["ratio"], "ratio", 1e-6)
        if self.scale[1] > 1 or self.scale[1] <= 0:
            raise ValueError(f"scale must lie within (0, 1], got {a['scale']!r}")

    def out_size(self, size: Size) -> Size:
        return self.size or size

    def describe(self) -> str:
        return f"scale={self.scale[0]:g}..{self.scale[1]:g}"

    def sample(self, n, size, like, gen, tries: int = 10):
        """Boxes (top, left, height, width) as torchvision draws them: up to 10 tries per sample,
        then the whole image clipped to the ratio range; all samples at once."""
        h, w = size
        dev = like.device
        area = _uniform(n * tries, *self.scale, like, gen).view(n, tries) * (h * w)
        ratio = torch.exp(_uniform(n * tries, math.log(self.ratio[0]), math.log(self.ratio[1]), like, gen)
                          ).view(n, tries)
        bw = torch.sqrt(area * ratio).round()
        bh = torch.sqrt(area / ratio).round()
        ok = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=dev))
        pick = first.clamp(min=0).view(-1, 1)
        bw, bh = bw.gather(1, pick).view(-1), bh.gather(1, pick).view(-1)
        # fallback: the central box with the ratio clipped to the range
        in_ratio = w / h
        fw, fh = (w, h) if self.ratio[0] <= in_ratio <= self.ratio[1] else (
            (round(h * self.ratio[0]), h) if in_ratio < self.ratio[0] else (w, round(w / self.ratio[1])))
        use = first >= 0
        bw = torch.where(use, bw, torch.full_like(bw, fw))
        bh = torch.where(use, bh, torch.full_like(bh, fh))
        top = torch.floor(torch.rand(n, generator=gen, device=dev) * (h - bh + 1))
        left = torch.floor(torch.rand(n, generator=gen, device=dev) * (w - bw + 1))
        top = torch.where(use, top, torch.div(h - bh, 2, rounding_mode="floor"))
        left = torch.where(use, left, torch.div(w - bw, 2, rounding_mode="floor"))
        return top, left, bh, bw

    @staticmethod
    def theta(boxes, size: Size) -> torch.Tensor:
        h, w = size
        top, left, bh, bw = (b.float() for b in boxes)
        zero = torch.zeros_like(top)
        cx = (left + bw / 2) / w * 2 - 1
        cy = (top + bh / 2) / h * 2 - 1
        return torch.stack([torch.stack([bw / w, zero, cx], 1), torch.stack([zero, bh / h, cy], 1)], 1)

    def apply(self, x, boxes):
        return _affine(x, self.theta(boxes, tuple(x.shape[-2:])), self.out_size(tuple(x.shape[-2:])), "bilinear")


class ColorJitter:
    """Brightness, contrast, saturation and hue, each with a factor drawn per sample (in this order)."""

    random = True
    float_only = True

    def __init__(self, arg, size: Size):
        a = _args(arg, {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}, "color_jitter")
        self.ranges = {}
        for k in ("brightness", "contrast", "saturation"):
            v = a[k]
            lo, hi = (max(0.0, 1 - v), 1 + v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
                else _range(v, k, 0.0)
            if (lo, hi) != (1.0, 1.0):
                self.ranges[k] = (lo, hi)
        h = a["hue"]
        lo, hi = (-h, h) if isinstance(h, (int, float)) and not isinstance(h, bool) else _range(h, "hue")
        if not -0.5 <= lo <= hi <= 0.5:
            raise ValueError(f"hue must lie within [-0.5, 0.5], got {h!r}")
        if (lo, hi) != (0.0, 0.0):
            self.ranges["hue"] = (lo, hi)

    def out_size(self, size: Size) -> Size:
        return size

    def describe(self) -> str:
        return ", ".join(f"{k}={lo:g}..{hi:g}" for k, (lo, hi) in self.ranges.items()) or "none"

    def sample(self, n, size, like, gen):
        return {k: _uniform(n, lo, hi, like, gen) for k, (lo, hi) in self.ranges.items()}

    def apply(self, x, factors):
        from torchvision.transforms.v2 import functional as TF

        def blend(a, b, r):
            return (a * r.view(-1, 1, 1, 1) + b * (1 - r.view(-1, 1, 1, 1))).clamp_(0, 1)

        color = x.shape[1] == 3
        if "brightness" in factors:
            x = (x * factors["brightness"].view(-1, 1, 1, 1)).clamp_(0, 1)
        if "contrast" in factors:
            gray = TF.rgb_to_grayscale(x) if color else x
            x = blend(x, gray.mean((1, 2, 3), keepdim=True), factors["contrast"])
        if "saturation" in factors and color:
            x = blend(x, TF.rgb_to_grayscale(x), factors["saturation"])
        if "hue" in factors and color:
            from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

            hsv = _rgb_to_hsv(x)
            hue = (hsv[:, 0] + factors["hue"].view(-1, 1, 1)).remainder(1.0)
            x = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], 1))
        return x


class Resize:
    random = False
    float_only = True

    def __init__(self, arg, size: Size):
        self.size = _pair(arg, "size")

    def out_size(self, size: Size) -> Size:
        return self.size

    def describe(self) -> str:
        return ""

    def sample(self, n, size, like, gen):
        return None

    def apply(self, x, _):
        from torchvision.transforms.v2 import functional as TF

        return TF.resize(x, list(self.size), antialias=True)


class CenterCrop(Resize):
    float_only = False

    def apply(self, x, _):
        h, w = x.shape[-2:]
        ch, cw = self.size
        if ch > h or cw > w:
            raise ValueError(f"center_crop of {ch}x{cw} from {h}x{w} images")
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[..., top:top + ch, left:left + cw]


@dataclass
class Normalize:
    mean: list
    std: list


def _normalize(arg, channels: int) -> Normalize:
    a = _args(arg, {"mean": None, "std": None}, "normalize")
    for k in ("mean", "std"):
        v = a[k]
        if not isinstance(v, list) or len(v) not in (1, channels) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise ValueError(f"{k} must be a list of 1 or {channels} numbers, got {v!r}")
    if any(s <= 0 for s in a["std"]):
        raise ValueError(f"std must be positive, got {a['std']!r}")
    return Normalize([float(x) for x in a["mean"]], [float(x) for x in a["std"]])


TRANSFORMS = {
    "flip": Flip, "vflip": VFlip, "crop": Crop, "rotation": Rotation, "resized_crop": ResizedCrop,
    "color_jitter": ColorJitter, "resize": Resize, "center_crop": CenterCrop, "normalize": None,
}


class Pipeline:
    """uint8 batch [N, C, H, W] on any device -> float batch on the same device.

    `size` is the (H, W) of the images it receives; `expect` is the model's input size, which
    the output must equal (checked here, before any work). Transforms named in `leave_out` are
    checked but not applied (errors keep the recipe's own indices).
    """

    def __init__(self, specs: list, where: str, channels: int, size: Size, expect: Size | None = None,
                 leave_out: frozenset[str] = frozenset()):
        self.where, self.in_size = where, tuple(size)
        self.ops: list[tuple[str, object]] = []
        self.norm: Normalize | None = None
        problems = []
        current = self.in_size
        for i, item in enumerate(specs):
            if not isinstance(item, dict) or len(item) != 1:
                problems.append(f"`{where}[{i}]`: a transform is a one-key mapping such as {{flip: 0.5}}")
                continue
            (name, arg), = item.items()
            if name not in TRANSFORMS:
                hint = did_you_mean(str(name), TRANSFORMS)
                problems.append(f"`{where}[{i}]`: unknown transform `{name}`" + (f"; {hint}" if hint else "")
                                + f" (known: {', '.join(TRANSFORMS)})")
                continue
            try:
                if name == "normalize":
                    if i != len(specs) - 1:
                        raise ValueError("normalize must be the last transform")
                    self.norm = _normalize(arg, channels)
                    continue
                op = TRANSFORMS[name](arg, current)
                made = op.out_size(current)
                if made != current and made[0] * made[1] > limit("image_pixels"):  # as large as an image read
                    raise ValueError(f"makes {made[0]}x{made[1]} images, over the limit of "
                                     f"{limit('image_pixels'):,} pixels (NCCOMPILE_LIMIT_IMAGE_PIXELS)")
            except (TypeError, ValueError, KeyError) as err:
                problems.append(f"`{where}[{i}]` ({name}): {err}" + _number_as_text_hint(arg))
                continue
            if name in leave_out:
                continue
            self.ops.append((name, op))
            current = op.out_size(current)
        if not problems and expect is not None and current != tuple(expect):
            changed = [(i, n) for i, (n, op) in enumerate(self.ops) if op.out_size(self.in_size) != self.in_size]
            last = f"`{where}[{changed[-1][0]}]` ({changed[-1][1]})" if changed else f"`{where}`"
            problems.append(f"{last} makes {current[0]}x{current[1]} images but the model's input is "
                            f"{expect[0]}x{expect[1]}\n  hint: leave out `size` so the transform keeps the "
                            "training input size, or change the input with --input")
        if problems:
            raise RecipeError("transforms", problems)
        self.out_size = current
        self.random = any(op.random for _, op in self.ops)
        self.channels = channels
        self.note = ""  # why the pipeline differs from the recipe's (set by its maker)
        self._consts: dict = {}

    def describe(self) -> str:
        steps, size = [], self.in_size
        for name, op in self.ops:
            new = op.out_size(size)
            detail = op.describe()
            steps.append(f"{name}{f'({detail})' if detail else ''}"
                         + (f" {size[0]}x{size[1]}->{new[0]}x{new[1]}" if new != size else ""))
            size = new
        if self.norm is not None:
            steps.append("normalize")
        head = f"{self.in_size[0]}x{self.in_size[1]}"
        text = (f"{head} -> " + " -> ".join(steps) + f" -> {size[0]}x{size[1]}") if steps else f"{head} (as is)"
        return text + (f" ({self.note})" if self.note else "")

    def _affine_params(self, device, dtype, is_float: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """scale and bias so that x * scale + bias = normalize(x / 255) (x / 255 already when is_float);
        made once per device: building them per batch would copy to the GPU and wait every time."""
        key = (str(device), dtype, is_float)
        if key not in self._consts:
            mean = torch.tensor(self.norm.mean if self.norm else [0.0], dtype=torch.float64)
            std = torch.tensor(self.norm.std if self.norm else [1.0], dtype=torch.float64)
            scale = 1 / std if is_float else 1 / (255 * std)
            self._consts[key] = (scale.view(1, -1, 1, 1).to(device, dtype), (-mean / std).view(1, -1, 1, 1).to(
                device, dtype))
        return self._consts[key]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
        n = x.shape[0]
        is_float = False
        for _, op in self.ops:
            if op.float_only and not is_float:
                x, is_float = x.to(dtype).div_(255), True
            x = op.apply(x, op.sample(n, tuple(x.shape[-2:]), x, generator))
        scale, bias = self._affine_params(x.device, dtype, is_float)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # one pass: float conversion, [0, 1] scaling and normalization
        return torch.addcmul(bias, x.to(dtype), scale)
