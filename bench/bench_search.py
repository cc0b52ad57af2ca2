"""Configurations analysed per second by `nccompile search` on a student-sized space (one core, no torch).

The space is the course's dw/pw student with its width, depth and kernel searched
(`specs/student_space.spec`); every configuration is elaborated, its budgets checked and its
int8 file sized exactly. Target: 500/s (moonshot 2,000/s).

Run: python bench/bench_search.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.search import search  # noqa: E402

SPEC = ROOT / "specs/student_space.spec"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    rates = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = search(SPEC)
        seconds = time.perf_counter() - t0
        rates.append(result.evaluated / seconds)
    print(f"{SPEC.name}: {result.evaluated} configurations ({len(result.candidates)} meet the budgets, "
          f"{result.rejected} break one); best of {args.repeat}: {max(rates):,.0f} configurations/s "
          f"(median {sorted(rates)[len(rates) // 2]:,.0f}/s); torch imported: {'torch' in sys.modules}")


if __name__ == "__main__":
    main()
