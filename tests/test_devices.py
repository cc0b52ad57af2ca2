"""Every built-in recipe end to end on each available device (CUDA skipped where there is none),
plus the device-independent parts of the GPU runtime: batch order, data cache, sizes, speed settings."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

import compiler
from runtime.cli import main
from runtime.data import Split
from runtime.data.batches import Placed, epoch_order
from runtime.recipe import BUILTIN_RECIPES

from .conftest import DATA

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real images not found at {DATA}")
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DEVICES = ["cpu", pytest.param("cuda", marks=_CUDA), pytest.param("auto", marks=_CUDA)]
RECIPES = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_builtin_recipe_end_to_end(recipe, device, tmp_path, capsys, in_root):
    out = tmp_path / "run"
    code = main(["specs/student.spec", "--recipe", recipe, "--data", str(DATA), "--device", device,
                 "--epochs", "1", "--set", "data.limit_per_class=6", "--set", "steps.1.iterations=1"
                 if recipe.startswith("prune") else "seed=0", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert all(s["status"] == "ran" for s in report["steps"]), report["steps"]
    assert "budgets at the training input 3x32x32:" in printed.out
    for step in report["steps"]:
        if step["kind"] == "quantize":  # the file written is the size the compiler predicted
            m = step["metrics"]
            assert m["file_bytes"] == m["predicted_bytes"] == (out / step["model_file"]).stat().st_size
            if recipe == "kd_wq":  # the 8-bit recipe also runs PyTorch's integer kernels
                assert "integer" in m and 0 <= m["integer"]["val_accuracy"] <= 1
        if step["kind"] == "evaluate":
            assert step["metrics"]["images"] == 60
    if device != "cpu":
        assert "training images in GPU memory; cuda: bf16, channels_last" in printed.out
        assert "training steps replayed as CUDA graphs" in printed.out
        assert "without CUDA graphs" not in printed.out  # no built-in step waits on the host


def test_batch_order_is_distributed_samplers():
    for n, bs, world in ((103, 16, 1), (103, 16, 2), (7, 3, 3), (64, 64, 1)):
        for rank in range(world):
            ours = [b.tolist() for b in epoch_order(n, bs, seed=5, epoch=2, rank=rank, world=world)]
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
            sampler.set_epoch(2)
            assert ours == list(BatchSampler(sampler, bs, drop_last=False))
    # a last training batch of one sample is dropped (BatchNorm cannot train on it), never a whole epoch
    assert [len(b) for b in epoch_order(65, 64, seed=0, epoch=0, drop_single=True)] == [64]
    assert [len(b) for b in epoch_order(1, 64, seed=0, epoch=0, drop_single=True)] == [1]


def test_placed_split_gathers_the_same_images_on_every_path():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    split = Split(images, torch.arange(50) % 5, [str(i) for i in range(50)])
    idx = torch.tensor([3, 1, 49, 0])
    cpu = Placed(split, torch.device("cpu"))
    assert torch.equal(cpu.images_at(idx), images[idx]) and torch.equal(cpu.range(10, 20), images[10:20])
    if torch.cuda.is_available():
        for on_device in (True, False):  # GPU memory, and pinned host memory with async copies
            gpu = Placed(split, torch.device("cuda"), on_device)
            for _ in range(3):
                assert torch.equal(gpu.images_at(idx).cpu(), images[idx])
            assert torch.equal(gpu.range(10, 20).cpu(), images[10:20])


@pytest.mark.slow
@needs_data
def test_second_run_reads_the_decoded_cache(tmp_path, capsys, in_root):
    args = ["specs/student.spec", "--recipe", "scratch", "--data", str(DATA), "--epochs", "1", "--device", "cpu",
            "--set", "data.limit_per_class=3", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert "decoded 30 images into the cache" in first
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    second = capsys.readouterr().out
    assert "30 decoded images from the cache" in second and "decoded 30 images into" not in second
    entries = sorted((tmp_path / "cache").glob("*.u8"))
    assert len(entries) == 2 and all(e.stat().st_size == 30 * 3 * 32 * 32 for e in entries)
    assert not list((tmp_path / "cache").glob("*.tmp"))
    # another training input is another entry, never a silently reused one
    assert main(args + ["--out", str(tmp_path / "c"), "--input", "3x16x16"]) == 0
    assert "decoded 30 images into the cache" in capsys.readouterr().out


def test_dry_run_shows_pipelines_at_the_training_input(capsys, in_root):
    assert main(["specs/student.spec", "--recipe", "scratch", "--input", "3x64x64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "transforms.train: 64x64 -> crop(padding=8) -> 64x64 (flip left out" in out
    assert "budgets at the training input 3x64x64:" in out and "bytes(int8) <= 300,000" in out


def test_pipeline_cropping_to_another_size_exits_2(tmp_path, capsys, in_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ntransforms:\n  train: [{crop: {size: 32, padding: 4}}]\n"
                      "steps: [{name: train, kind: train, epochs: 1}]\n")
    assert main(["specs/student.spec", "--recipe", str(recipe), "--input", "3x64x64", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "transforms.train[0]` (crop) makes 32x32 images but the model's input is 64x64" in err


def test_no_shipped_recipe_names_a_pixel_size():
    import yaml

    for path in BUILTIN_RECIPES.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        for which in ("train", "eval"):
            for t in (raw.get("transforms") or {}).get(which) or []:
                (name, arg), = t.items()
                assert not (isinstance(arg, dict) and "size" in arg) and name not in ("resize", "center_crop"), \
                    f"{path.name}: {t}"


def test_speed_defaults_per_device():
    from runtime.recipe import SpeedConfig
    from runtime.train.speed import resolve

    cpu = resolve(SpeedConfig(), torch.device("cpu"))
    # channels_last wherever oneDNN runs the CPU's convolutions (x86 builds): faster there (BENCHMARKS.md)
    assert (cpu.precision, cpu.channels_last, cpu.compile) == ("fp32", torch.backends.mkldnn.is_available(), "off")
    assert not cpu.background_checkpoints and not cpu.cudnn_benchmark
    cuda = resolve(SpeedConfig(), torch.device("cuda"))
    assert cuda.channels_last and cuda.precision in ("bf16", "fp16")
    assert cuda.background_checkpoints and cuda.cudnn_benchmark
    forced = resolve(SpeedConfig(precision="bf16", channels_last=True), torch.device("cpu"))
    assert forced.dtype == torch.bfloat16 and forced.channels_last


def test_cudnn_autotuning_is_on_for_the_run_only(tmp_path, capsys, in_root):
    """A process-wide switch: set while the steps run, restored after, also after a failure."""
    from compiler.errors import NcError
    from runtime.run.runner import Options, run

    seen = []
    before = torch.backends.cudnn.benchmark

    def options(lr):
        return Options("specs/student.spec", "scratch", out=str(tmp_path / lr), device="cpu", epochs=1,
                       sets=("data.limit_per_class=10", "speed.cudnn_benchmark=true", f"optimizer.lr={lr}"),
                       on_epoch=lambda label, row: seen.append(torch.backends.cudnn.benchmark))

    assert run(options("0.003")) == 0
    assert torch.backends.cudnn.benchmark == before
    with pytest.raises(NcError, match="became"):  # the loss stops being a number
        run(options("1e30"))
    assert torch.backends.cudnn.benchmark == before
    assert seen == [True]
    assert "cuDNN autotuning" in capsys.readouterr().out


@pytest.mark.slow
def test_bf16_channels_last_training_on_cpu(tmp_path, capsys, in_root):
    """The CUDA defaults (bf16 autocast, channels_last), exercised on the CPU: the same code path."""
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--device", "cpu",
                 "--set", "data.limit_per_class=10", "--set", "speed.precision=bf16",
                 "--set", "speed.channels_last=true", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu: bf16, channels_last" in printed
    report = json.loads((out / "report.json").read_text())
    model = compiler.compile_spec("specs/student.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    assert (out / report["steps"][0]["model_file"]).stat().st_size == compiler.predicted_bytes(model, "fp32")


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, capsys, in_root):
    out = tmp_path / "run"
    code = main(["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--device", "cpu",
                 "--set", "data.limit_per_class=10", "--set", "optimizer.lr=1e30", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "training loss became" in err and "learning rate" in err, err
    assert not (out / "steps/train/best.safetensors").exists()
    assert os.path.exists(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("transforms", [[], [{"flip": 0.5}, {"crop": {"padding": 4}}, {"resized_crop": {}},
                                            {"rotation": 10}, {"color_jitter": {"brightness": 0.2, "hue": 0.05}}]])
@pytest.mark.parametrize("mode", ["eager", "graphs", "quantization-aware"])
def test_training_epoch_syncs_with_the_host_a_fixed_number_of_times(transforms, mode):
    """PyTorch's sync debug mode counts synchronizing calls: 12 batches make no more than 2 batches do
    (a few per epoch: its metrics and one-time setup), never one per batch; also with every tensor
    rounded in one pass (runtime.quant.fusedquant), and with steps replayed as CUDA graphs."""
    import warnings
    from types import SimpleNamespace

    from compiler.fileformat import parse_format
    from runtime.data.transforms import Pipeline
    from runtime.quant import fakequant
    from runtime.recipe import SpeedConfig
    from runtime.train.loop import train_epoch
    from runtime.train.speed import resolve
    from runtime.train.trainstep import TrainStep

    device = torch.device("cuda")
    speed = resolve(SpeedConfig(), device)
    model = compiler.compile_spec("specs/student.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    module = compiler.build_module(model).to(device)
    if mode == "quantization-aware":
        fakequant.attach(module, model, parse_format("int4"), "learned")
    module = speed.prepare(module)
    optimizer = torch.optim.AdamW(module.parameters(), fused=True)
    pipeline = Pipeline(transforms, "t", 3, (32, 32), expect=(32, 32))
    counts = []
    for n in (128, 768):
        split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n) % 10, [])
        placed = Placed(split, device)
        ctx = SimpleNamespace(speed=speed, rank=0, world=1, interactive=False,
                              recipe=SimpleNamespace(seed=0, data=SimpleNamespace(batch_size=64)))
        loss = lambda logits, y, idx, x: torch.nn.functional.cross_entropy(logits, y)  # noqa: E731
        step = TrainStep(speed, module, optimizer, None, loss, graphs=mode == "graphs")
        for _ in range(2 if mode == "graphs" else 1):  # graphs: captured before the counted epoch, at any n
            train_epoch(ctx, step, placed, pipeline, 0, "warm-up")
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_epoch(ctx, step, placed, pipeline, 1, "counted")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in seen))
    assert counts[1] <= counts[0] <= 4, counts  # H200, torch 2.11: [4, 3] and [3, 3]


def test_flips_are_left_out_for_data_that_is_not_mirror_symmetric(capsys, in_root):
    assert main(["specs/student.spec", "--recipe", "kd_wq", "--dry-run"]) == 0  # digits
    out = capsys.readouterr().out
    assert "transforms.train: 32x32 -> crop(padding=4) -> 32x32 (flip left out: scikit-learn digits" in out
    if DATA.is_dir():
        assert main(["specs/student.spec", "--recipe", "kd_wq", "--data", str(DATA), "--dry-run"]) == 0
        assert "transforms.train: 32x32 -> flip(p=0.5) -> crop(padding=4) -> 32x32\n" in capsys.readouterr().out
