"""The run directory: every file written atomically, and the record of finished steps.

    RUN/spec.<ext> RUN/recipe.yaml    what was run (resolved)
    RUN/state.json                    finished steps, keyed by a hash of their inputs
    RUN/report.json RUN/report.md     one entry per step
    RUN/steps/<name>/...              per-step files (model.safetensors, curves.png, ...)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .weights import atomic_write


def write_json(path: Path, data) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


class RunDir:
    def __init__(self, root: Path, writer: bool = True):
        self.root = Path(root)
        self.writer = writer  # only rank 0 writes under torchrun
        self.state_path = self.root / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"steps": {}}

    def step_dir(self, name: str) -> Path:
        return self.root / "steps" / name

    def finished(self, name: str, key: str) -> dict | None:
        entry = self.state["steps"].get(name)
        if not entry or entry.get("key") != key:
            return None
        model_file = entry.get("result", {}).get("model_file")
        if model_file and not (self.root / model_file).exists():
            return None
        return entry

    def mark_finished(self, name: str, key: str, result: dict) -> None:
        self.state["steps"][name] = {"key": key, "result": result}
        if self.writer:
            write_json(self.state_path, self.state)
