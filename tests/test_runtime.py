"""Runtime: recipes, data, steps, resume, distributed, on real images (cifar10-mini) and digits."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compiler
from runtime.cli import main
from runtime.train.losses import kd_loss

from .conftest import DATA, ROOT

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real images not found at {DATA}")

SMALL_TEACHER = """
model small_teacher(classes: int = 10) {
    input 3x32x32
    conv(32) bn relu maxpool(2) conv(64) bn relu maxpool(2) conv(64) bn relu gap flatten linear(classes)
}
"""


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# --- the distillation loss ---------------------------------------------------------

def test_kd_loss_equals_the_seed_formula_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 3, 1, 4])
    T, a = 20.0, 0.5
    # by hand: (1-a) CE(s, y) + a T^2 KL(p_t || p_s), KL averaged over the batch
    p_s = torch.softmax(s, 1)
    ce = -torch.log(p_s[torch.arange(4), y]).mean()
    q_t, q_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    kl = (q_t * (q_t.log() - q_s.log())).sum(1).mean()
    expected = (1 - a) * ce + a * T * T * kl
    assert torch.allclose(kd_loss(s, t, y, T, a), expected, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, y, T, 0.0), ce, atol=1e-6)  # alpha 0 is plain cross-entropy


# --- end to end on real images -------------------------------------------------------

@pytest.mark.slow
@needs_data
def test_scratch_recipe_end_to_end(tmp_path, capsys, in_root):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["specs/student.spec", "--recipe", "scratch", "--data", str(DATA),
                                 "--set", "data.limit_per_class=100", "--epochs", "3", "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert [s["name"] for s in steps] == ["train", "evaluate"]
    for s in steps:
        assert {"name", "kind", "params", "file_bytes", "val_accuracy", "seconds"} <= set(s)
    train = steps[0]
    assert train["params"] == 256_522  # the student with 10 classes
    assert train["file_bytes"] == (out / "steps/train/model.safetensors").stat().st_size
    assert steps[1]["val_accuracy"] > 0.13  # chance is 0.10 on 1,000 validation images
    assert steps[1]["val_accuracy"] == pytest.approx(train["val_accuracy"])  # best checkpoint is what is kept
    for png in ("steps/train/curves.png", "steps/evaluate/confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| train | train | student |" in stdout and (out / "report.md").exists()
    metrics = json.loads((out / "steps/evaluate/metrics.json").read_text())
    assert len(metrics["per_class_accuracy"]) == 10 and sum(map(sum, metrics["confusion_matrix"])) == 1000
    # running the same command again does no work
    code, stdout, _ = run_cli(["specs/student.spec", "--recipe", "scratch", "--data", str(DATA),
                               "--set", "data.limit_per_class=100", "--epochs", "3", "--out", str(out)], capsys)
    assert code == 0 and stdout.count("already done") == 2


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("background", [False, True], ids=["inline checkpoints", "background checkpoints"])
def test_kd_recipe_end_to_end_and_resume_after_kill(tmp_path, in_root, background):
    """kd: teacher trained first, then distilled student; a run killed mid-distillation resumes after
    the last epoch whose line was printed, also when checkpoints are written on a thread (CUDA's way)."""
    teacher = tmp_path / "teacher.spec"
    teacher.write_text(SMALL_TEACHER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-u", "-m", "runtime", "specs/student.spec", "--recipe", "kd", "--data", str(DATA),
           "--set", "data.limit_per_class=100", "--set", f"models.teacher.spec={teacher}",
           "--set", "steps.teacher.epochs=2", "--set", "steps.distill.epochs=3", "--out", str(out),
           "--set", f"speed.background_checkpoints={str(background).lower()}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("distill epoch 1/3"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (out / "steps/distill/model.safetensors").exists()
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "teacher: already done" in again.stdout
    assert "distill: resuming after epoch 1 of 3" in again.stdout
    assert "distill epoch 1/3" not in again.stdout and "distill epoch 3/3" in again.stdout
    report = json.loads((out / "report.json").read_text())
    kinds = {s["name"]: s for s in report["steps"]}
    assert kinds["teacher"]["status"] == "done earlier" and kinds["distill"]["status"] == "ran"
    assert kinds["evaluate"]["val_accuracy"] > 0.13


@needs_data
def test_food11_layout_and_predict(tmp_path, capsys, in_root):
    """The course's food-11 layout: labels from file names, testing/ predicted to a CSV."""
    root = tmp_path / "food"
    classes = ["airplane", "cat", "ship"]
    for split, name, n in (("train", "training", 30), ("val", "validation", 10)):
        (root / name).mkdir(parents=True)
        for label, c in enumerate(classes):
            for i, f in enumerate(sorted((DATA / split / c).iterdir())[:n]):
                shutil.copy(f, root / name / f"{label}_{i}.jpg")
    (root / "testing").mkdir()
    for i, f in enumerate(sorted((DATA / "val" / "cat").iterdir())[50:57]):
        shutil.copy(f, root / "testing" / f"{i:04d}.jpg")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
name: food
input: 3x32x32
steps:
  - {name: train, kind: train, epochs: 1}
  - {name: predict, kind: predict}
""")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["specs/student.spec", "--recipe", str(recipe), "--data", str(root),
                                 "--out", str(out)], capsys)
    assert code == 0, err
    rows = (out / "steps/predict/predictions.csv").read_text().splitlines()
    assert rows[0] == "Id,Category" and len(rows) == 8
    assert all(r.split(",")[1] in ("0", "1", "2") for r in rows[1:])
    assert "3 classes" in stdout


def test_digits_default_and_dry_run(capsys, in_root):
    code, stdout, err = run_cli(["specs/student.spec", "--recipe", "kd", "--dry-run"], capsys)
    assert code == 0, err
    assert "scikit-learn digits" in stdout and "1. teacher [train]" in stdout and "needs: teacher" in stdout


# --- bad input: one clear message, exit code 2 --------------------------------------------

def _jpeg(path: Path, seed: int = 0) -> None:
    from torchvision.io import encode_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    path.write_bytes(encode_jpeg(torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8, generator=g)).numpy().tobytes())


def _tiny_folder(root: Path, classes=("a", "b"), per_class=3) -> Path:
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                _jpeg(root / split / c / f"{i}.jpg", i)
    return root


@pytest.mark.parametrize("args,fragment", [
    (["--set", "optimizer.lrr=0.1"], "unknown key `optimizer.lrr`; did you mean `lr`?"),
    (["--set", "steps.train.epochz=2"], "unknown key `steps[0] (train).epochz`; did you mean `epochs`?"),
    (["--set", "steps.train.epochs=many"], "`steps[0] (train).epochs`: Input should be a valid integer"),
    (["--set", "data.batch_size=0"], "`data.batch_size`: Input should be greater than or equal to 1"),
    (["--set", "steps.trian.epochs=2"], "no step `trian`"),
    # a value that fits no member of a union: one message at the field, not one per member
    (["--set", "speed.channels_last=sometimes"],
     "`speed.channels_last`: Input should be 'auto' or a valid boolean, unable to interpret input (got 'sometimes')"),
    (["--set", "steps.train.lr=fast"], "`steps[0] (train).lr`: Input should be a valid number"),
    (["--data", "/nonexistent/images"], "data folder /nonexistent/images does not exist"),
])
def test_bad_recipe_or_data_is_one_clear_error(args, fragment, capsys, in_root):
    code, _, err = run_cli(["specs/student.spec", "--recipe", "scratch", "--dry-run", *args], capsys)
    assert code == 2 and fragment in err, err
    assert "Traceback" not in err


def test_unknown_recipe_and_step_kind(tmp_path, capsys, in_root):
    code, _, err = run_cli(["specs/student.spec", "--recipe", "scrach"], capsys)
    assert code == 2 and "did you mean `scratch`?" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  - {name: a, kind: trian}\n  - {name: b, kind: evaluate, model: teacher}\n")
    code, _, err = run_cli(["specs/student.spec", "--recipe", str(recipe), "--dry-run"], capsys)
    assert code == 2 and "unknown step kind `trian`; did you mean `train`?" in err


def test_step_needing_missing_artifact(tmp_path, capsys, in_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodels: {teacher: {spec: %s}}\nsteps:\n  - {name: d, kind: distill}\n"
                      % (ROOT / "specs/teacher.spec"))
    code, _, err = run_cli(["specs/student.spec", "--recipe", str(recipe), "--dry-run"], capsys)
    assert code == 2 and "step `d` needs `teacher` weights, which no earlier step produces" in err


def test_empty_class_folder(tmp_path, capsys, in_root):
    root = _tiny_folder(tmp_path / "d")
    (root / "val" / "c").mkdir()
    (root / "train" / "c").mkdir()
    code, _, err = run_cli(["specs/student.spec", "--recipe", "scratch", "--data", str(root), "--dry-run"], capsys)
    assert code == 2 and f"class folder {root / 'train' / 'c'} is empty" in err


def test_unreadable_image_named_or_skipped(tmp_path, capsys, in_root):
    root = _tiny_folder(tmp_path / "d")
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    args = ["specs/student.spec", "--recipe", "scratch", "--data", str(root), "--epochs", "1",
            "--out", str(tmp_path / "run")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and f"{bad}: cannot decode image" in err and "on_bad_image" in err
    code, out, err = run_cli(args + ["--set", "data.on_bad_image=skip"], capsys)
    assert code == 0, err
    assert "skipped 1 unreadable image(s)" in out


def test_teacher_checkpoint_with_wrong_class_count(tmp_path, capsys, in_root):
    import compiler
    from runtime.weights import save_model

    teacher = tmp_path / "teacher.spec"
    teacher.write_text(SMALL_TEACHER)
    eleven = compiler.compile_spec(teacher, params={"classes": 11})
    ckpt = tmp_path / "teacher11.safetensors"
    save_model(compiler.build_module(eleven), eleven, ckpt)
    root = _tiny_folder(tmp_path / "d")
    code, _, err = run_cli(["specs/student.spec", "--recipe", "kd", "--data", str(root), "--dry-run",
                            "--set", f"models.teacher.spec={teacher}",
                            "--set", f"models.teacher.checkpoint={ckpt}"], capsys)
    assert code == 2 and "has 11 classes" in err and "the data has 2" in err, err


def test_truncated_checkpoint_is_a_clear_error(tmp_path, capsys, in_root):
    teacher = tmp_path / "teacher.spec"
    teacher.write_text(SMALL_TEACHER)
    ckpt = tmp_path / "t.safetensors"
    ckpt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    code, _, err = run_cli(["specs/student.spec", "--recipe", "kd", "--dry-run",
                            "--set", f"models.teacher.spec={teacher}", "--set", f"models.teacher.checkpoint={ckpt}"],
                           capsys)
    assert code == 2 and "not a readable safetensors file" in err


def test_spec_hard_coding_another_class_count(tmp_path, capsys, in_root):
    spec = tmp_path / "fixed.spec"
    spec.write_text("model fixed { input 3x32x32 conv(8) gap flatten linear(11) }")
    code, _, err = run_cli([str(spec), "--recipe", "scratch", "--dry-run"], capsys)
    assert code == 2 and "outputs 11 values but the data has 10 classes" in err


def test_budget_checked_at_training_input(tmp_path, capsys, in_root):
    spec = tmp_path / "b.spec"
    spec.write_text("model b(classes: int = 10) { input 3x8x8 budget macs <= 100k conv(8) gap flatten "
                    "linear(classes) }")
    assert run_cli([str(spec)], capsys)[0] == 0  # 8x8: within budget
    code, out, err = run_cli([str(spec), "--recipe", "scratch", "--dry-run"], capsys)  # the recipe trains at 32x32
    assert code == 1 and "exceeds its budget(s) at the training input 3x32x32" in err


def test_a_recipe_sets_the_training_size_not_the_models_channels(tmp_path, capsys, in_root):
    """Every built-in recipe trains at 3x32x32; a grayscale model stays grayscale (it was built for 3
    channels without a word), and the header says what the spec declares."""
    spec = tmp_path / "gray.spec"
    spec.write_text("model gray(classes: int = 10) { input 1x16x16 conv(8) gap flatten linear(classes) }")
    code, out, _ = run_cli([str(spec), "--recipe", "scratch", "--epochs", "1", "--set", "data.limit_per_class=5",
                            "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and "training input 1x32x32 (the spec declares 1x16x16;" in out, out
    from runtime.weights import ModelFile

    assert ModelFile(tmp_path / "run/steps/train/model.safetensors").model().input_shape == (1, 32, 32)
    code, out, _ = run_cli([str(spec), "--recipe", "scratch", "--input", "3x8x8", "--dry-run"], capsys)
    assert code == 0 and "training input 3x8x8 (the spec declares 1x16x16;" in out  # --input says it all


# --- distributed --------------------------------------------------------------------

def test_the_tensors_of_the_last_summing_collectives_outlive_leaving_the_process_group(tmp_path):
    """gloo's worker thread must never be the one that frees them: at exit that aborts the process (torch 2.14,
    "terminate called without an active exception"; the torchrun test failed so about one run in ten)."""
    script = (
        "import gc, sys, time, weakref, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from runtime.train import distributed\n"
        "distributed.start(torch.device('cpu'))\n"
        "assert distributed.active()\n"
        "def summed():\n"
        "    kept, dropped = torch.ones(3), torch.ones(3)\n"
        "    distributed.sum_over_ranks(kept)\n"
        "    torch.distributed.all_reduce(dropped)\n"
        "    return weakref.ref(kept), weakref.ref(dropped)\n"
        "kept, dropped = summed()\n"
        "time.sleep(0.2)  # the worker thread has let go of both works by now\n"
        "distributed.stop()\n"
        "gc.collect()\n"
        "print('alive after stop:', kept() is not None, dropped() is not None)\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29530), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "alive after stop: True False" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("background", [False, True], ids=["inline checkpoints", "background checkpoints"])
def test_torchrun_two_cpu_processes(tmp_path, in_root, background):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29517 + background), "-m", "runtime", "specs/student.spec",
                           "--recipe", "scratch", "--data", str(DATA), "--set", "data.limit_per_class=20",
                           "--epochs", "2", "--device", "cpu", "--out", str(out),
                           "--set", f"speed.background_checkpoints={str(background).lower()}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["train", "evaluate"]
    # rank 0 alone prints: one line per epoch, not two
    assert proc.stdout.count("train epoch 2/2") == 1
    assert (out / "steps/train/model.safetensors").stat().st_size == report["steps"][0]["file_bytes"]
    # validation is shared out over the two ranks and summed: every image once, the same accuracy
    # as one process evaluating the saved model alone
    from runtime.data import list_source, load
    from runtime.data.transforms import Pipeline
    from runtime.recipe import DataConfig
    from runtime.train.evaluation import score_split
    from runtime.weights import ModelFile

    metrics = report["steps"][1]["metrics"]
    cfg = DataConfig(path=str(DATA), limit_per_class=20, cache=False)
    data = load(list_source(cfg), cfg, (3, 32, 32), 0)
    model = compiler.compile_spec("specs/student.spec", params={"classes": 10}, input_shape=(3, 32, 32))
    alone = score_split(ModelFile(out / "steps/train/model.safetensors").build(model), data.val,
                        Pipeline([], "eval", 3, (32, 32)), 10)
    assert metrics["images"] == alone.images == len(data.val) == 200
    assert metrics["val_accuracy"] == pytest.approx(alone.accuracy, abs=1e-9)
    assert metrics["confusion_matrix"] == alone.confusion.tolist()


def test_transform_pipeline():
    from runtime.data.transforms import Pipeline
    from runtime.recipe import RecipeError

    batch = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    out = Pipeline([{"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}], "eval", 3, (8, 8))(batch)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))
    aug = Pipeline([{"crop": {"size": 8, "padding": 2}}, {"flip": 0.5}, {"rotation": 10}], "train", 3, (8, 8))
    assert aug.random and aug(batch).shape == (4, 3, 8, 8)
    with pytest.raises(RecipeError, match="unknown transform `flop`; did you mean `flip`"):
        Pipeline([{"flop": 0.5}], "transforms.train", 3, (8, 8))


def _idx(path: Path, magic: int, dims: tuple, data: torch.Tensor) -> None:
    import struct

    path.write_bytes(struct.pack(">" + "i" * (1 + len(dims)), magic, *dims) + data.numpy().tobytes())


@pytest.mark.slow
@pytest.mark.parametrize("recipe, unknown_from", [("kd_wq", None), ("prune", "evaluate")])
def test_planned_step_keys_are_the_keys_the_run_records(recipe, unknown_from, tmp_path, in_root):
    """What `study --dry-run` says is shared rests on these: known before any work, up to the steps
    after one that reshapes the model (its new spec exists only once it has run)."""
    from runtime.run.runner import Options, prepare
    from runtime.run.stepkeys import planned_keys

    teacher = tmp_path / "teacher.spec"
    teacher.write_text(SMALL_TEACHER)
    opts = Options("specs/student.spec", recipe, sets=("data.limit_per_class=5", f"models.teacher.spec={teacher}",
                                                       "steps.quantize.integer_inference=false")
                   if recipe == "kd_wq" else ("data.limit_per_class=5",), epochs=1, device="cpu",
                   out=str(tmp_path / "run"))
    got, _, listing, slots, plan, _ = prepare(opts)
    planned = planned_keys(got, plan, slots, listing, slots["student"].model.input_shape)
    assert main([opts.spec, "--recipe", recipe, *[a for s in opts.sets for a in ("--set", s)], "--epochs", "1",
                 "--device", "cpu", "--out", opts.out]) == 0
    ran = json.loads((tmp_path / "run" / "state.json").read_text())["steps"]
    names = [s.config.name for s in plan.steps]
    cut = names.index(unknown_from) if unknown_from else len(names)
    assert planned[:cut] == [ran[n]["key"] for n in names[:cut]] and all(k is None for k in planned[cut:])


def _mnist_files(tmp_path: Path) -> None:
    """MNIST's files laid out locally (nothing is downloaded): 60 train / 20 test, labels 0, 1, 2."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        labels = torch.arange(n, dtype=torch.uint8) % 3
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        images[:, 4:24, 4:24] += (labels * 60).reshape(-1, 1, 1).to(torch.uint8)  # learnable brightness
        _idx(raw / f"{prefix}-images-idx3-ubyte", 2051, (n, 28, 28), images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, (n,), labels)


def test_torchvision_dataset_by_name(tmp_path, capsys, in_root):
    """A torchvision dataset by name (MNIST files laid out locally: nothing is downloaded)."""
    _mnist_files(tmp_path)
    recipe = tmp_path / "m.yaml"
    recipe.write_text(f"""
name: mnist
input: 3x16x16
data: {{source: torchvision, name: MNIST, root: {tmp_path}, download: false}}
steps:
  - {{name: train, kind: train, epochs: 1}}
""")
    spec = tmp_path / "s.spec"
    spec.write_text("model s(classes: int = 2) { input 3x16x16 conv(8) bn relu gap flatten linear(classes) }")
    code = main([str(spec), "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "60 train / 20 val images, 10 classes" in out  # MNIST declares its 10 classes
    missing = tmp_path / "none"
    recipe.write_text(recipe.read_text().replace(str(tmp_path), str(missing)))
    assert main([str(spec), "--recipe", str(recipe), "--dry-run"]) == 2
    assert "set data.download: true to download it" in capsys.readouterr().err


@pytest.mark.slow
def test_limit_per_class_limits_every_split_of_every_source(tmp_path):
    """`data.limit_per_class` takes the first N of each class in the training and the validation split
    alike, whatever the source (digits once limited only its training split, torchvision not at all)."""
    from runtime.data import list_source, load
    from runtime.recipe import DataConfig

    _mnist_files(tmp_path)
    sources = {"digits": DataConfig(limit_per_class=5),
               "torchvision": DataConfig(source="torchvision", name="MNIST", root=str(tmp_path), limit_per_class=4)}
    if DATA.is_dir():  # the real images, where this checkout sits beside them
        sources["folder"] = DataConfig(path=str(DATA), limit_per_class=3, cache=False)
    for source, cfg in sources.items():
        data = load(list_source(cfg), cfg, (1, 8, 8), seed=0)
        for name, split in (("train", data.train), ("val", data.val)):
            counts = torch.bincount(split.labels).tolist()
            assert set(counts) - {0} == {cfg.limit_per_class}, (source, name, counts)
        unlimited = cfg.model_copy(update={"limit_per_class": None})
        full = load(list_source(unlimited), unlimited, (1, 8, 8), seed=0)
        assert len(full.val.labels) > len(data.val.labels), source
        first = [i for i, y in enumerate(full.train.labels.tolist()) if y == 0][:cfg.limit_per_class]
        assert torch.equal(data.train.images[data.train.labels == 0], full.train.images[first]), source


# --- confinement: nothing is written outside the run directory ---------------------------------

@pytest.mark.parametrize("override, fragment", [
    ("name=../../x", "the recipe name '../../x' is used in file paths"),
    ("steps.0.name=/tmp/evil", "the step's name '/tmp/evil' is used in file paths"),
    ("steps.train.name=..", "the step's name '..' is used in file paths"),
    ("steps.train.model=../up", "the step's model '../up' is used in file paths"),
])
def test_names_that_become_paths_are_plain(override, fragment, tmp_path, capsys, in_root):
    code = main(["specs/student.spec", "--recipe", "scratch", "--set", override, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert not (tmp_path / "run").exists()


def test_model_keys_are_plain_names(tmp_path, capsys, in_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodels: {'../../x': {spec: ../teacher.spec}}\nsteps: [{name: t, kind: train}]\n")
    assert main(["specs/student.spec", "--recipe", str(recipe), "--dry-run"]) == 2
    assert "the model name '../../x' is used in file paths" in capsys.readouterr().err


def test_one_run_at_a_time_per_out_folder(tmp_path, capsys, in_root):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    args = ["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--device", "cpu",
            "--set", "data.limit_per_class=5", "--out", str(out)]
    (out / ".nccompile.lock").write_text(f"{os.getpid()} {socket.gethostname()}")  # a live run holds it
    assert main(args) == 2
    assert "another nccompile run" in capsys.readouterr().err
    assert not (out / "report.json").exists()
    (out / ".nccompile.lock").write_text(f"999999999 {socket.gethostname()}")  # left by a run that died
    assert main(args) == 0
    assert (out / "report.json").exists() and not (out / ".nccompile.lock").exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys, in_root):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["specs/student.spec", "--recipe", "scratch", "--epochs", "1", "--out", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and target.read_text() == "keep me"


def test_csv_cells_that_would_be_formulas_are_escaped():
    from runtime.steps.evaluate import csv_cell

    assert [csv_cell(t) for t in ("=HYPERLINK(1)", "+1", "-2", "@x", "plain", "a=b")] == [
        "'=HYPERLINK(1)", "'+1", "'-2", "'@x", "plain", "a=b"]


@pytest.mark.parametrize("n", [10, 1000])
def test_confusion_plot_stays_bounded_for_many_classes(n, tmp_path):
    """It grew 60 pixels per class (1,000 classes: a 60,000-pixel square image that took minutes);
    now it stops at 2,000 pixels, naming every class up to 60 and indexing them past that."""
    from PIL import Image

    from runtime.plots import NAMED_CLASSES, confusion_matrix

    path = tmp_path / "c.png"
    names = [f"class-{i}" for i in range(n)]
    confusion_matrix(torch.eye(n, dtype=torch.int64) * 3, names, path, "t")
    width, height = Image.open(path).size
    assert 300 < width <= 2000 and 300 < height <= 2000
    assert (n <= NAMED_CLASSES) == (width < 1000)  # 10 classes: a small figure


@pytest.mark.slow
def test_an_evaluate_step_names_its_metrics_after_the_split_it_scores(tmp_path, capsys, in_root):
    """`split: train` was reported as `val_accuracy`: a training score read as validation accuracy."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  - {name: t, kind: train, epochs: 1}\n"
                      "  - {name: on_train, kind: evaluate, split: train}\n  - {name: on_val, kind: evaluate}\n")
    out = tmp_path / "run"
    assert main(["specs/student.spec", "--recipe", str(recipe), "--input", "3x16x16", "--device", "cpu",
                 "--set", "data.limit_per_class=5", "--out", str(out)]) == 0, capsys.readouterr()
    steps = {s["name"]: s["metrics"] for s in json.loads((out / "report.json").read_text())["steps"]}
    on_train, on_val = steps["on_train"], steps["on_val"]
    assert on_train["split"] == "train" and "val_accuracy" not in on_train and 0 <= on_train["train_accuracy"] <= 1
    assert on_val["split"] == "val" and "train_accuracy" not in on_val and 0 <= on_val["val_accuracy"] <= 1
    written = json.loads((out / "steps" / "on_train" / "metrics.json").read_text())
    assert written["train_accuracy"] == on_train["train_accuracy"]
