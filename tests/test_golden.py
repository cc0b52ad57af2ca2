"""Golden files: the summary table and the error messages, exactly as a user sees them.

Regenerate after an intended change with `UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`
and review the diff.
"""
from __future__ import annotations

import os

import pytest

from runtime.cli import main

from .conftest import ROOT

GOLDEN = ROOT / "tests" / "golden"
ERRORS = sorted(p.name for p in (GOLDEN / "errors").iterdir() if p.suffix in (".spec", ".yaml"))

CLI_CASES = {
    "summary_student": ["specs/student.spec"],
    "summary_resnet18_depth2": ["specs/resnet18.spec", "--depth", "2"],
    "summary_student_yaml_cifar": ["specs/student.yaml", "--param", "classes=10", "--input", "3x32x32"],
    "param_wrong_type": ["specs/student.spec", "--param", "classes=ten"],
    "param_unknown": ["specs/student.spec", "--param", "clases=10"],
    "input_too_small": ["specs/student.spec", "--input", "3x8x8"],
    "input_malformed": ["specs/student.spec", "--input", "3by32"],
    "missing_file": ["specs/nope.spec"],
    "budget_exceeded_width": ["specs/student.spec", "--param", "base=24"],
}


def _run(argv, capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    return f"$ nccompile {' '.join(argv)}\nexit: {code}\n--- stdout\n{out}--- stderr\n{err}"


def _check(name: str, text: str) -> None:
    path = GOLDEN / "cli" / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("name", ERRORS)
def test_error_golden(name, capsys, in_root):
    _check(f"errors_{name.replace('.', '_')}", _run([f"tests/golden/errors/{name}"], capsys))


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_golden(name, capsys, in_root):
    _check(name, _run(CLI_CASES[name], capsys))


def test_goldens_show_what_the_issue_asks_for():
    """The golden set keeps covering each required message (guards against silent deletion)."""
    texts = {p.name: p.read_text() for p in (GOLDEN / "cli").iterdir()}
    required = {
        "errors_syntax_error_spec.txt": "expected: `)`, `,`",
        "errors_unknown_layer_spec.txt": "did you mean `conv`?",
        "errors_residual_mismatch_spec.txt": "does not match the identity shortcut's",
        "errors_linear_not_flat_spec.txt": "linear expects a flat input",
        "errors_linear_in_mismatch_spec.txt": "input features but its input has 16",
        "errors_budget_exceeded_spec.txt": "exit: 1",
        "errors_wrong_type_spec.txt": "expects int, got 24.0 (float)",
        "errors_missing_input_spec.txt": "has no input shape",
        "param_wrong_type.txt": "expects int, got `ten`",
    }
    for name, fragment in required.items():
        assert fragment in texts[name], name
    for name, text in texts.items():
        assert "Traceback" not in text, name
