"""Predicted file bytes (from the spec alone) equal the size of the file actually written."""
from __future__ import annotations

import pytest
import torch

import compiler
from compiler import fileformat
from runtime.weights import decode, save_model, state_tensors

from .conftest import SPECS

SPECS_TO_CHECK = ["student.spec", "student.yaml", "origin.spec", "resnet18.spec", "teacher.spec"]


@pytest.mark.parametrize("name", SPECS_TO_CHECK)
@pytest.mark.parametrize("fmt", fileformat.FORMATS)
def test_predicted_bytes_equal_written_file(tmp_path, name, fmt):
    model = compiler.compile_spec(SPECS / name)
    module = compiler.build_module(model)
    path = tmp_path / f"model.{fmt}.safetensors"
    written = save_model(module, model, path, fmt)
    assert path.stat().st_size == written == compiler.analyse(model).bytes[fmt]


def test_student_int8_file_fits_seed_limit_and_roundtrips(tmp_path):
    model = compiler.compile_spec(SPECS / "student.spec")
    module = compiler.build_module(model)
    path = tmp_path / "student.int8.safetensors"
    size = save_model(module, model, path, "int8")
    assert size <= 268_471  # the seed's pickled 8-bit file
    from safetensors.torch import load_file

    restored = decode(load_file(path), "int8")
    original = state_tensors(module)
    assert set(restored) == set(original)
    for k, v in original.items():
        step = (v.max() - v.min()).item() / 255
        assert torch.allclose(restored[k], v, atol=step / 2 + 1e-6), k


def test_header_formula_tracks_metadata_and_names():
    """The formula is the real safetensors layout, also for odd names and non-ASCII metadata."""
    from safetensors.torch import save

    tensors = {"b.weight": torch.zeros(3, 2), "a": torch.zeros(5, dtype=torch.uint8), "é": torch.zeros(2).half(),
               "z": torch.zeros(1, dtype=torch.int64), "empty": torch.zeros(0)}
    meta = {"spec": 'model "x" {\n\tconv(16) # ünïcode\n}', "n": "1"}
    stored = [fileformat.StoredTensor(k, {torch.float32: "F32", torch.uint8: "U8", torch.float16: "F16",
                                          torch.int64: "I64"}[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    assert fileformat.file_bytes(stored, meta) == len(save(tensors, metadata=meta))
