"""Epoch checkpoints written inline or on a background thread (runtime.train.checkpoints)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from runtime.train.checkpoints import CheckpointWriter, Progress


def _training_state():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                 torch.nn.LazyLinear(4))
    module(torch.randn(2, 3, 6, 6))
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    progress = Progress(best_acc=0.5, best_epoch=1, history=[{"epoch": 1}],
                        best_state={k: v.clone() for k, v in module.state_dict().items()})
    return module, optimizer, schedule, progress


@pytest.mark.parametrize("background", [False, True])
def test_the_file_holds_its_epochs_weights_although_training_goes_on(tmp_path, background):
    module, optimizer, schedule, progress = _training_state()
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    printed = []
    writer = CheckpointWriter(SimpleNamespace(is_main=True), tmp_path, "key", background)
    writer.save(module, optimizer, schedule, 0, progress,
                then=lambda: printed.append((tmp_path / "last.safetensors").exists()))
    with torch.no_grad():  # the next epoch changes the weights and the optimizer's state in place
        for p in module.parameters():
            p.add_(1.0)
        for state in optimizer.state.values():
            state["exp_avg"].add_(1.0)
    writer.finish()
    assert printed == [True]  # the epoch's line comes after its file is on disk
    saved = load_file(tmp_path / "last.safetensors")
    for k, v in expected.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(saved[f"model.{k}"], v), k
    assert (tmp_path / "best.safetensors").exists()


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_background_and_inline_files_hold_the_same(tmp_path):
    files = []
    for background in (False, True):
        module, optimizer, schedule, progress = _training_state()
        d = tmp_path / str(background)
        writer = CheckpointWriter(SimpleNamespace(is_main=True), d, "key", background)
        writer.save(module, optimizer, schedule, 0, progress, then=lambda: None)
        writer.finish()
        files.append([_read(d / name) for name in ("last.safetensors", "best.safetensors")])
    for (meta_a, tensors_a), (meta_b, tensors_b) in zip(*files):
        assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def test_a_failed_background_write_raises_at_the_next_wait(tmp_path):
    module, optimizer, schedule, progress = _training_state()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    printed = []
    writer = CheckpointWriter(SimpleNamespace(is_main=True), blocked / "step", "key", background=True)
    writer.save(module, optimizer, schedule, 0, progress, then=lambda: printed.append(1))
    with pytest.raises(OSError):
        writer.finish()
    assert printed == []  # no line claims an epoch that was not saved
    writer.finish()  # the error is raised once
    writer.save(module, optimizer, schedule, 1, progress, then=lambda: printed.append(2))
    with pytest.raises(OSError):
        writer.finish()
    writer.finish(raise_error=False)


@pytest.mark.parametrize("background", [False, True])
def test_a_write_that_fails_midway_keeps_the_last_good_file_and_leaves_no_fragment(tmp_path, monkeypatch,
                                                                                      background):
    import runtime.train.checkpoints as checkpoints

    module, optimizer, schedule, progress = _training_state()
    writer = CheckpointWriter(SimpleNamespace(is_main=True), tmp_path, "key", background)
    writer.save(module, optimizer, schedule, 0, progress, then=lambda: None)
    writer.finish()
    good = (tmp_path / "last.safetensors").read_bytes()

    def half_then_fail(tensors, metadata=None):
        def write_to(path):
            path.write_bytes(b"\x00" * 100)
            raise OSError("disk full")
        return write_to

    monkeypatch.setattr(checkpoints, "_prepared", half_then_fail)
    printed = []
    with pytest.raises(OSError, match="disk full"):
        writer.save(module, optimizer, schedule, 1, progress, then=lambda: printed.append(1))
        writer.finish()
    assert printed == []
    assert (tmp_path / "last.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.safetensors"]


@pytest.mark.parametrize("metadata", [None, {"progress": "{}"}])
def test_the_prepared_writer_writes_what_save_file_writes(tmp_path, metadata):
    from safetensors.torch import save_file

    from runtime.train.checkpoints import _prepared

    module, optimizer, _, _ = _training_state()
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    write_to = _prepared(tensors, metadata)  # flattened here, written later (on the writer thread)
    tensors.clear()  # the writer keeps what it needs alive
    write_to(tmp_path / "prepared.safetensors")
    save_file({k: v.detach().clone() for k, v in module.state_dict().items()}, str(tmp_path / "plain.safetensors"),
              metadata=metadata)
    assert (tmp_path / "prepared.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
