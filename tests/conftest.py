from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
# the real images beside the checkout; NCCOMPILE_TEST_DATA points elsewhere (a GPU machine's copy)
DATA = Path(os.environ.get("NCCOMPILE_TEST_DATA") or ROOT.parent / "shared" / "data" / "cifar10-mini")


@pytest.fixture
def in_root(monkeypatch):
    """Run with the repository root as working directory (paths in messages are relative)."""
    monkeypatch.chdir(ROOT)
    return ROOT


def pytest_configure(config):
    os.environ.setdefault("NCCOMPILE_DEBUG", "")
    # decoded-image cache of this test session (subprocesses inherit it); never the user's ~/.cache
    os.environ["NCCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="nccompile-test-cache-")
