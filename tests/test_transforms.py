"""Batched transforms against torchvision's per-image functions, fed the same random parameters."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from runtime.data.transforms import ColorJitter, Crop, Flip, Pipeline, ResizedCrop, Rotation
from runtime.recipe import RecipeError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(n=16, h=20, w=24, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_flip_matches_per_image(device):
    x = images(device=device)
    op = Flip(0.5, (20, 24))
    mask = op.sample(len(x), (20, 24), x, torch.Generator(device).manual_seed(1))
    out = op.apply(x, mask)
    for img, m, o in zip(x, mask.tolist(), out):
        assert torch.equal(o, TF.horizontal_flip(img) if m else img)
    assert 0 < mask.sum() < len(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_padded_crop_matches_per_image(device, mode):
    x = images(device=device)
    op = Crop({"padding": 4, "padding_mode": mode}, (20, 24))
    top, left = op.sample(len(x), (20, 24), x, torch.Generator(device).manual_seed(2))
    out = op.apply(x, (top, left))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for img, t, left_, o in zip(x, top.tolist(), left.tolist(), out):
        padded = TF.pad(img, [4], padding_mode={"edge": "edge"}.get(mode, mode))
        assert torch.equal(o, TF.crop(padded, t, left_, 20, 24))
    assert top.min() >= 0 and top.max() <= 8 and left.max() <= 8


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_matches_per_image(device):
    x = images(device=device).float()
    op = Rotation(30, (20, 24))
    angles = op.sample(len(x), (20, 24), x, torch.Generator(device).manual_seed(3))
    out = op.apply(x, angles)
    for img, a, o in zip(x, angles.tolist(), out):
        ref = TF.rotate(img, a)
        # nearest-neighbour sampling: a pixel may round the other way at a boundary
        assert (o.round() != ref).float().mean() < 0.02
    assert angles.abs().max() <= 30 and angles.std() > 5


@pytest.mark.parametrize("device", DEVICES)
def test_resized_crop_matches_per_image(device):
    x = images(device=device).float()
    op = ResizedCrop({"scale": [0.3, 1.0]}, (20, 24))
    boxes = op.sample(len(x), (20, 24), x, torch.Generator(device).manual_seed(4))
    out = op.apply(x, boxes)
    assert out.shape == x.shape
    for i, (img, o) in enumerate(zip(x, out)):
        t, left_, h, w = (int(b[i]) for b in boxes)
        assert 0 <= t and t + h <= 20 and 0 <= left_ and left_ + w <= 24
        ref = TF.resized_crop(img, t, left_, h, w, [20, 24], antialias=False)
        # Same bilinear geometry; only the outermost pixels differ: grid sampling blends in the real
        # neighbours outside the box where torchvision repeats the box's edge.
        torch.testing.assert_close(o[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-3, rtol=1e-4)
    areas = (boxes[2] * boxes[3]) / (20 * 24)
    assert areas.min() >= 0.25 and areas.max() <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_color_jitter_matches_per_image(device):
    x = images(device=device).float() / 255
    op = ColorJitter({"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}, (20, 24))
    f = op.sample(len(x), (20, 24), x, torch.Generator(device).manual_seed(5))
    out = op.apply(x, f)
    for i, (img, o) in enumerate(zip(x, out)):
        ref = TF.adjust_brightness(img, f["brightness"][i].item())
        ref = TF.adjust_contrast(ref, f["contrast"][i].item())
        ref = TF.adjust_saturation(ref, f["saturation"][i].item())
        ref = TF.adjust_hue(ref, f["hue"][i].item())
        torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)
    assert f["hue"].abs().max() <= 0.1 and f["brightness"].min() >= 0.6


def test_pipeline_normalizes_in_one_pass_and_keeps_sizes():
    x = images(8, 32, 32)
    p = Pipeline([{"crop": {"padding": 4}}, {"flip": 0.5}, {"normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}],
                 "transforms.train", 3, (32, 32), expect=(32, 32))
    out = p(x, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32 and p.random
    plain = Pipeline([{"normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}], "t", 3, (32, 32))
    torch.testing.assert_close(plain(x), TF.normalize(x.float() / 255, [0.5] * 3, [0.25] * 3))
    assert "32x32 -> crop(padding=4) -> flip(p=0.5) -> normalize -> 32x32" == p.describe()
    assert plain(x, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_crop_padding_as_a_fraction_follows_the_image_size():
    assert Crop({"padding": 0.125}, (32, 32)).padding == 4
    assert Crop({"padding": 0.125}, (64, 48)).padding == 6
    p = Pipeline([{"crop": {"padding": 0.125}}], "t", 3, (64, 64), expect=(64, 64))
    assert p.describe() == "64x64 -> crop(padding=8) -> 64x64"


def test_same_generator_state_gives_the_same_batch():
    x = images(8, 32, 32)
    p = Pipeline([{"resized_crop": {"scale": [0.5, 1]}}, {"rotation": 10}, {"color_jitter": {"brightness": 0.3}}],
                 "t", 3, (32, 32))
    a = p(x, torch.Generator().manual_seed(7))
    b = p(x, torch.Generator().manual_seed(7))
    c = p(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_size_mismatch_names_the_transform_and_both_sizes():
    with pytest.raises(RecipeError) as err:
        Pipeline([{"flip": 0.5}, {"crop": {"size": 32, "padding": 4}}], "transforms.train", 3, (64, 64),
                 expect=(64, 64))
    msg = str(err.value)
    assert "transforms.train[1]` (crop)" in msg and "32x32" in msg and "64x64" in msg


@pytest.mark.parametrize("spec, fragment", [
    ({"flip": 2}, "probability"),
    ({"crop": {"padding": -1}}, "non-negative"),
    ({"crop": {"paddin": 4}}, "did you mean `padding`"),
    ({"rotation": "a lot"}, "degrees"),
    ({"color_jitter": {"hue": 0.9}}, "hue"),
    ({"resized_crop": {"scale": [0.5, 2]}}, "scale"),
    ({"blur": 3}, "unknown transform"),
    ({"crop": {"padding": 4, "fill": 300}}, "fill must be a pixel value"),
    ({"crop": {"padding": 4, "fill": "abc"}}, "fill must be a pixel value"),
    ({"crop": {"padding": 32}}, "padding of 32 needs images larger than 32x32"),
    ({"rotation": 1e300}, "within [-360, 360]"),
    ({"resize": 10_000}, "over the limit of 67,108,864 pixels"),
    ({"rotation": "1e9"}, "hint: YAML reads `1e9` as text; write the number as 1000000000.0"),
])
def test_bad_transform_arguments(spec, fragment):
    with pytest.raises(RecipeError) as err:
        Pipeline([spec], "transforms.train", 3, (32, 32))
    assert fragment in str(err.value)


def test_crop_fill_is_a_pixel_value_before_and_after_a_float_transform():
    """`fill: 255` pads with white whether the crop sees uint8 pixels or [0, 1] floats (after a rotation)."""
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    white = {"crop": {"padding": 2, "fill": 255}}
    for specs in ([white], [{"rotation": 0}, white]):
        pipe = Pipeline(specs, "transforms.train", 3, (8, 8))
        out = pipe(x, torch.Generator().manual_seed(0))
        assert out.min() == 0 and out.max() == 1.0, specs  # black images, white padding, scaled to [0, 1]
