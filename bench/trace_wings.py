"""Which wing of runtime/ calls which, during a real (tiny) recipe run: the house's layering as the run
follows it, not as the imports say.

Every Python call made while the run executes is seen (sys.setprofile); a call from a function of one
wing into a function of another is an edge. Edges that go down the table of tests/test_architecture.py
(cli -> study -> run -> steps -> train/rewrite -> data/weights -> quant -> ground) are the pipeline;
an edge back up is a callback (a loss closure a step hands the training loop, the study's epoch hook):
listed with its count, so one that is not a deliberate callback shows.

Run: python bench/trace_wings.py [--recipe kd_wq|prune] [--epochs 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.cli import main  # noqa: E402
from tests.test_architecture import MAY_IMPORT  # noqa: E402

RUNTIME = str(ROOT / "runtime")


def _wing(filename: str) -> str | None:
    if not filename.startswith(RUNTIME):
        return None
    part = Path(filename).relative_to(RUNTIME).parts[0]
    return part[:-3] if part.endswith(".py") else part


def _below(wing: str) -> set[str]:
    """Every wing that `wing` may reach through the import table."""
    seen, todo = set(), [wing]
    while todo:
        for t in MAY_IMPORT.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def main_trace(recipe: str, epochs: int) -> int:
    edges: Counter = Counter()
    first: list[str] = []
    wing_of: dict = {}

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        callee = wing_of.get(code)
        if callee is None:
            callee = wing_of[code] = _wing(code.co_filename) or ""
        if not callee:
            return
        if callee not in first:
            first.append(callee)
        caller_frame = frame.f_back
        while caller_frame is not None:  # the nearest runtime frame above (library frames in between)
            caller = wing_of.get(caller_frame.f_code)
            if caller is None:
                caller = wing_of[caller_frame.f_code] = _wing(caller_frame.f_code.co_filename) or ""
            if caller:
                if caller != callee:
                    edges[(caller, callee)] += 1
                return
            caller_frame = caller_frame.f_back

    with tempfile.TemporaryDirectory() as tmp:
        args = ["specs/student.spec", "--recipe", recipe, "--epochs", str(epochs), "--input", "3x16x16",
                "--set", "data.limit_per_class=20", "--out", str(Path(tmp) / "run"), "--device", "cpu"]
        sys.setprofile(profile)
        try:
            code = main(args)
        finally:
            sys.setprofile(None)
    print(f"nccompile {' '.join(args[:4])} ... -> exit {code}")
    print(f"wings in the order first entered: {' -> '.join(first)}")
    down = {e: n for e, n in edges.items() if e[1] in _below(e[0])}
    up = {e: n for e, n in edges.items() if e not in down}
    print(f"{len(down)} downward edges ({sum(down.values()):,} calls), {len(up)} upward ({sum(up.values()):,} calls)")
    for (a, b), n in sorted(up.items(), key=lambda kv: -kv[1]):
        print(f"  up: {a} -> {b}  {n:,} calls")
    return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="kd_wq")
    parser.add_argument("--epochs", type=int, default=1)
    a = parser.parse_args()
    sys.exit(main_trace(a.recipe, a.epochs))
