"""The training step's fast path, counted in dispatched operators (each one a kernel launch on a GPU,
where small models at batch 64 are bound by launches): nccompile's step costs the plain tuned loop's
operators plus 6 for its metrics, and random augmentation costs the same at any batch size
(no Python loop over samples). Counted on the CPU, so CI checks what the GPU bench measures."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import compiler
from runtime.data import Split
from runtime.data.batches import Placed
from runtime.data.transforms import Pipeline
from runtime.train.loop import train_epoch
from runtime.train.speed import Speed
from runtime.train.trainstep import TrainStep

from .measure import Dispatched

SIZE = 16
AUGMENT = [{"flip": 0.5}, {"crop": {"padding": 2}}, {"resized_crop": {}}, {"rotation": 10},
           {"color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05}}]


def _module():
    model = compiler.compile_spec("specs/student.spec", params={"classes": 10}, input_shape=(3, SIZE, SIZE))
    torch.manual_seed(0)
    return compiler.build_module(model).train().to(memory_format=torch.channels_last)


def _nccompile_epoch(n: int, batch: int, transforms: list) -> Dispatched:
    """Operators of one nccompile training epoch of `n` images (bf16 autocast, channels_last: the
    CUDA defaults, here on the CPU)."""
    speed = Speed(torch.device("cpu"), "bf16", True, "off", None)
    module = _module()
    optimizer = torch.optim.AdamW(module.parameters())
    pipeline = Pipeline(transforms, "t", 3, (SIZE, SIZE), expect=(SIZE, SIZE))
    split = Split(torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8), torch.arange(n) % 10, [])
    ctx = SimpleNamespace(speed=speed, rank=0, world=1, interactive=False,
                          recipe=SimpleNamespace(seed=0, data=SimpleNamespace(batch_size=batch)))
    loss = lambda logits, y, idx, x: F.cross_entropy(logits, y)  # noqa: E731
    placed = Placed(split, speed.device)
    step = TrainStep(speed, module, optimizer, None, loss)
    train_epoch(ctx, step, placed, pipeline, 0, "warm-up")  # optimizer state made
    counter = Dispatched()
    with counter:
        train_epoch(ctx, step, placed, pipeline, 1, "counted")
    return counter


def _tuned_epoch(n: int, batch: int) -> Dispatched:
    """Operators of the plain tuned loop (bench_gpu.py's): gather, scale, channels_last, bf16 autocast."""
    module = _module()
    optimizer = torch.optim.AdamW(module.parameters())
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8)
    labels = torch.arange(n) % 10

    def epoch():
        for idx in torch.split(torch.randperm(n), batch):
            x = images[idx].float().div_(255).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(module(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    epoch()
    counter = Dispatched()
    with counter:
        epoch()
    return counter


def _per_batch(count, batch: int) -> tuple[float, float]:
    """(operators per batch, operators per epoch) from epochs of 2 and 6 batches."""
    small, large = count(2 * batch, batch).total, count(6 * batch, batch).total
    per_batch = (large - small) / 4
    return per_batch, small - 2 * per_batch


def test_training_step_costs_the_tuned_loops_operators_plus_its_metrics():
    ours, ours_epoch = _per_batch(lambda n, b: _nccompile_epoch(n, b, []), 8)
    tuned, tuned_epoch = _per_batch(_tuned_epoch, 8)
    assert tuned > 300  # the model's forward, backward and optimizer: the bulk of a step
    # loss and correct-count accumulation on the device (6 ops); the gather/normalize pass costs what
    # the tuned loop's gather, scaling and layout change cost
    assert ours - tuned <= 6, (ours, tuned)
    assert ours_epoch - tuned_epoch <= 12, (ours_epoch, tuned_epoch)  # order, generator, one stacked sync


@pytest.mark.slow
@pytest.mark.parametrize("transforms", [AUGMENT[:2], AUGMENT], ids=["flip+crop", "all random transforms"])
def test_random_augmentation_costs_the_same_operators_at_any_batch_size(transforms):
    small, _ = _per_batch(lambda n, b: _nccompile_epoch(n, b, transforms), 4)
    large, _ = _per_batch(lambda n, b: _nccompile_epoch(n, b, transforms), 32)
    plain, _ = _per_batch(lambda n, b: _nccompile_epoch(n, b, []), 32)
    assert small == large, (small, large)  # a loop over samples would grow with the batch
    assert large - plain <= 60 * len(transforms), (large, plain)
