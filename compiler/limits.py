"""Limits on what nccompile reads, so no input can make it hang or exhaust memory.

Each limit has a default and an environment variable that changes it (a positive integer):

    spec file size      256 KiB     NCCOMPILE_LIMIT_SPEC_BYTES
    recipe file size    256 KiB     NCCOMPILE_LIMIT_RECIPE_BYTES
    repetition count    10,000      NCCOMPILE_LIMIT_REPEAT       (`layer x N`)
    layers              100,000     NCCOMPILE_LIMIT_LAYERS       (after elaboration)
    input elements      2^26        NCCOMPILE_LIMIT_INPUT_ELEMENTS  (C x H x W of a forward pass)
    model file          4 GiB       NCCOMPILE_LIMIT_MODEL_BYTES  (as its header declares; xz stops there)
    image pixels        2^26        NCCOMPILE_LIMIT_IMAGE_PIXELS (width x height, read from the header)
    study grid points   10,000      NCCOMPILE_LIMIT_STUDY_TRIALS (each is a training run, checked first)
    study file size     256 KiB     NCCOMPILE_LIMIT_STUDY_BYTES

YAML (specs, recipes, studies) is read without aliases (`&a` / `*a`): expanding them is how a
1 KB file becomes gigabytes, and nothing nccompile reads needs them.

Files are read only when they are regular files (not a folder, device or pipe) and never
past their limit, so `nccompile /dev/urandom` stops at once with a clear error.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from .errors import FileProblems, UsageError

DEFAULTS = {"spec_bytes": 256 * 1024, "recipe_bytes": 256 * 1024, "study_bytes": 256 * 1024, "repeat": 10_000,
            "layers": 100_000, "input_elements": 2 ** 26, "model_bytes": 4 * 1024 ** 3,
            "image_pixels": 2 ** 26, "study_trials": 10_000}


def limit(name: str) -> int:
    raw = os.environ.get(f"NCCOMPILE_LIMIT_{name.upper()}")
    if raw is None:
        return DEFAULTS[name]
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"NCCOMPILE_LIMIT_{name.upper()}={raw!r}: expected a positive integer")
    return int(raw)


def read_text(path: str | Path, what: str, limit_name: str) -> str:
    """The UTF-8 text of a regular file of at most `limit(limit_name)` bytes, or a UsageError."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read {what} ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UsageError(f"{path}: {kind}; expected a {what}")
    cap = limit(limit_name)
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as err:
        raise UsageError(f"{path}: cannot read {what} ({err.strerror})") from None
    if len(data) > cap:
        raise UsageError(f"{path}: larger than the {cap:,}-byte limit for a {what}\n"
                         f"  hint: raise it with NCCOMPILE_LIMIT_{limit_name.upper()}=N")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte {err.start}); expected a {what}") from None


class NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and integers of more than 30 digits (Python refuses to
    convert 4,300 or more, and no setting needs 30) with the position of the first one."""

    def construct_yaml_int(self, node):
        if len(node.value) > 30:
            raise yaml.MarkedYAMLError(None, None, f"an integer of {len(node.value):,} digits is too large",
                                       node.start_mark)
        return super().construct_yaml_int(node)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.MarkedYAMLError(None, None, "aliases (*name) are not allowed here; write the value out",
                                       mark)
        return super().compose_node(parent, index)


NoAliasLoader.add_constructor("tag:yaml.org,2002:int", NoAliasLoader.construct_yaml_int)


def read_yaml(path: str | Path, what: str, limit_name: str, error: type[FileProblems]):
    """The data of a YAML file (a recipe, a study) read as `read_text` reads it, without aliases; a
    syntax error or a too-deep nesting is `error` at `path:line:col`."""
    source = str(path)
    try:
        return yaml.load(read_text(path, what, limit_name), Loader=NoAliasLoader)
    except RecursionError:
        raise error(source, ["the YAML nests too deeply"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise error(where, [f"invalid YAML: {getattr(err, 'problem', None) or err}"]) from None
