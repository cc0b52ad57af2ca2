"""The shipped specs reproduce the course's numbers, and analysis == built module."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import compiler
from compiler.fileformat import weight_tensors
from compiler.ir import without_spans
from compiler.parse import parse_file
from compiler.validate import validate

from .conftest import SPECS
from .measure import measure

SEED_PARAMS = {
    "origin.spec": 2_168_203,
    "student.spec": 256_779,
    "student.yaml": 256_779,
    "resnet18.spec": 11_182_155,
    "teacher.spec": 11_182_155,
    # the student plus four squeeze-excitation gates: 2*C*r + r + C each, for
    # (C, r) = (32, 8), (64, 16), (128, 32), (256, 16): 552 + 2,128 + 8,352 + 8,464
    "student_se.spec": 256_779 + 19_496,
    # the student at base 17: 17/16 of every width (11 classes)
    "student_4bit.spec": 288_773,
    # the student as a search space, at its defaults: the student with 10 classes
    "student_space.spec": 256_522,
}


@pytest.mark.parametrize("path", sorted(p.name for p in SPECS.glob("*.spec")))
def test_every_shipped_spec_is_listed_and_its_precision_file_is_predicted(path, tmp_path):
    assert path in SEED_PARAMS, f"add {path} to SEED_PARAMS"
    model = compiler.compile_spec(SPECS / path)
    if model.definition.precision is None:
        return
    from runtime.weights import save_model

    out = tmp_path / "m.safetensors"
    assert save_model(compiler.build_module(model), model, out, "spec") == out.stat().st_size == \
        compiler.predicted_bytes(model, "spec")
    assert compiler.analyse(model).ok


@pytest.mark.parametrize("name", sorted(SEED_PARAMS))
def test_shipped_spec_matches_seed_and_module(name):
    model = compiler.compile_spec(SPECS / name)
    analysis = compiler.analyse(model)
    assert analysis.params == SEED_PARAMS[name]
    module = compiler.build_module(model)
    got = measure(module, model.input_shape)
    assert got["params"] == analysis.params
    assert got["macs"] == analysis.macs
    # every layer's output shape, by module path
    for row in analysis.rows:
        if row.path in got["shapes"]:
            assert got["shapes"][row.path] == tuple(row.output), row.path
    assert got["output"] == model.root.out_shape
    # buffers and the stored tensor list are those of the real state dict
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert [(k, tuple(v.shape)) for k, v in state.items()] == weight_tensors(model)
    assert analysis.buffers == sum(b.numel() for n, b in module.named_buffers() if "num_batches" not in n)


def _course_student(classes=11):
    """The course's StudentNet, written the plain PyTorch way (HW7 architecture design)."""
    width = [16, 32, 64, 128, 256, 256, 256, 256]
    layers = [nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.MaxPool2d(2, 2, 0))]
    for i in range(7):
        block = [nn.Conv2d(width[i], width[i], 3, 1, 1, groups=width[i]), nn.BatchNorm2d(width[i]), nn.ReLU6(),
                 nn.Conv2d(width[i], width[i + 1], 1)]
        if i < 3:
            block.append(nn.MaxPool2d(2, 2, 0))
        layers.append(nn.Sequential(*block))
    layers.append(nn.AdaptiveAvgPool2d((1, 1)))
    return nn.Sequential(nn.Sequential(*layers), nn.Flatten(), nn.Linear(256, classes))


def test_student_parameter_shapes_equal_course_studentnet():
    ours = compiler.build_module(compiler.compile_spec(SPECS / "student.spec"))
    course = _course_student()
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in course.parameters()]
    x = torch.randn(2, 3, 64, 64)
    # same shapes in the same order: the course's weights load positionally and give the same outputs
    with torch.no_grad():
        for p_ours, p_course in zip(ours.parameters(), course.parameters()):
            p_ours.copy_(p_course)
    course.eval()
    assert torch.allclose(ours(x), course(x), atol=1e-5)


def test_dsl_and_yaml_students_are_identical():
    dsl, _, pending_dsl = parse_file(SPECS / "student.spec")
    yml, _, pending_yml = parse_file(SPECS / "student.yaml")
    assert pending_dsl == pending_yml == []
    dsl, yml = validate(dsl), validate(yml)
    a, b = without_spans(dsl), without_spans(yml)
    a.pop("path"), b.pop("path")
    assert a == b
    m1 = compiler.build_module(compiler.compile_spec(SPECS / "student.spec"), seed=3)
    m2 = compiler.build_module(compiler.compile_spec(SPECS / "student.yaml"), seed=3)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert list(s1) == list(s2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_dsl_resnet18_matches_torchvision_shapes():
    ours = compiler.build_module(compiler.compile_spec(SPECS / "resnet18.spec"))
    ref = torchvision.models.resnet18(num_classes=11)
    assert [tuple(v.shape) for v in ours.state_dict().values()] == [tuple(v.shape) for v in ref.state_dict().values()]


def test_teacher_keeps_torchvision_names():
    module = compiler.build_module(compiler.compile_spec(SPECS / "teacher.spec"))
    ref = torchvision.models.resnet18(num_classes=11)
    assert list(module.state_dict()) == list(ref.state_dict())


def test_build_is_deterministic_per_seed():
    model = compiler.compile_spec(SPECS / "student.spec")
    a, b, c = (compiler.build_module(model, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])


def test_param_and_input_overrides():
    model = compiler.compile_spec(SPECS / "student.spec", params={"classes": 10, "base": 8},
                                  input_shape=(3, 32, 32))
    analysis = compiler.analyse(model)
    got = measure(compiler.build_module(model), (3, 32, 32))
    assert got["output"] == (10,)
    assert got["params"] == analysis.params and got["macs"] == analysis.macs
