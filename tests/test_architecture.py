"""The house rules, checked on the source: layering and no import cycles.

Every `import` statement counts, also those inside functions: a lazy import hides a
dependency from the reader, not from the design.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGES = ("compiler", "runtime")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports, resolved (relative imports, submodules named in `from`)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import compiler.x.y` attribute paths -> the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_compiler_never_imports_runtime():
    bad = sorted(f"{m} imports {t}" for m, targets in _graph().items() if m.split(".")[0] == "compiler"
                 for t in targets if t.split(".")[0] == "runtime")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_relative_and_nested_imports():
    graph = _graph()
    assert "runtime.run.runner" in graph["runtime.cli"]      # nested `from .run.runner import ...`
    assert "compiler.tree" in graph["compiler.elaborate"]    # relative `from .tree import ...`


@pytest.mark.slow
def test_a_wheel_runs_a_builtin_recipe_from_another_directory(tmp_path):
    """Recipes are package data: a non-editable install finds `kd` and the teacher spec it names."""
    import subprocess
    import sys

    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    (elsewhere / "specs").mkdir(parents=True)
    (elsewhere / "specs" / "student.spec").write_text((ROOT / "specs" / "student.spec").read_text())
    proc = subprocess.run([sys.executable, "-m", "runtime", "specs/student.spec", "--recipe", "kd", "--dry-run"],
                          cwd=elsewhere, capture_output=True, text=True, env={"PYTHONPATH": str(target), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert f"model teacher: {target / 'runtime' / '_specs' / 'teacher.spec'}" in proc.stdout
    # Every package of the tree comes from the wheel, not from an editable install's finder, which
    # would quietly supply a package the wheel left out.
    packages = sorted(".".join(p.parent.relative_to(ROOT).parts) for top in ("compiler", "runtime")
                      for p in (ROOT / top).rglob("__init__.py"))
    where = subprocess.run([sys.executable, "-c", f"import importlib\nfor n in {packages!r}: "
                            "print(importlib.import_module(n).__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env={"PYTHONPATH": str(target), "PATH": ""})
    assert where.returncode == 0, where.stderr
    outside = [f for f in where.stdout.split() if not f.startswith(str(target))]
    assert not outside, f"packages missing from the wheel: {outside}"
    assert (target / "runtime" / "_specs" / "studies" / "q2_kd.yaml").is_file()
    assert (target / "runtime" / "_specs" / "zoo" / "resnet50.spec").is_file()


def test_every_package_ships_in_the_wheel():
    """A package missing from pyproject's list installs nowhere but in an editable checkout."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


# runtime/'s wings and loose modules, bottom up, and what each may import of the others. A new
# top-level module or package of runtime/ must take its place here.
GROUND = {"files", "recipe", "rundir", "usage", "plots"}
MAY_IMPORT = {
    "files": set(), "recipe": set(), "ctrl_c": set(), "usage": set(), "rundir": {"files"}, "plots": {"files"},
    "quant": set(),                                   # grid codes, folding, fake/fused quantization
    "weights": {"files", "quant"},                    # the model file
    "torchvision_state": {"weights"},
    "data": GROUND,                                   # sources -> decode -> load, transforms, cache, batches
    "rewrite": {"weights"},                           # module surgery behind one rebuild()
    "deploy": {"files", "weights", "quant"},                # files standard runtimes run (ONNX, ExecuTorch), latency
    "train": GROUND | {"data", "weights", "torchvision_state"},
    "steps": GROUND | {"data", "train", "quant", "rewrite", "deploy", "weights", "profile"},  # pruning times its widths
    "tracking": {"ctrl_c"},                           # TensorBoard event files, MLflow runs
    "run": GROUND | {"data", "train", "steps", "weights", "torchvision_state", "tracking"},
    "study": GROUND | {"run", "tracking", "ctrl_c"},
    "profile": GROUND | {"deploy"},                   # latency tables: units timed on a target (int8: as deployed)
    "cli": GROUND | {"run", "study", "weights", "tracking", "profile", "ctrl_c"},
    "__main__": {"cli", "ctrl_c"},                    # the Ctrl-C handler goes in before any import
}


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "runtime" and len(parts) > 1 else None


def _wing_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, targets in _graph().items():
        if (w := _wing(m)) is None:
            continue
        out.setdefault(w, set()).update(t for t in map(_wing, targets) if t is not None and t != w)
    return out


def test_every_wing_of_runtime_imports_only_what_its_layer_allows():
    graph = _wing_graph()
    unplaced = sorted(set(graph) - set(MAY_IMPORT))
    assert not unplaced, f"place these in tests/test_architecture.py's MAY_IMPORT: {unplaced}"
    bad = sorted(f"runtime.{w} imports runtime.{t}" for w, ts in graph.items() for t in ts if t not in MAY_IMPORT[w])
    assert not bad, "\n".join(bad)


def test_runtime_stays_shallow_and_acyclic_between_wings():
    """The longest import chain between wings and loose modules, and the modules left loose."""
    graph = _wing_graph()
    depth: dict[str, int] = {}

    def longest(w, seen=()):
        assert w not in seen, f"import cycle between wings: {' -> '.join((*seen, w))}"
        if w not in depth:
            depth[w] = max((1 + longest(t, (*seen, w)) for t in graph.get(w, ())), default=0)
        return depth[w]

    assert max(longest(w) for w in graph) <= 9
    loose = [p.stem for p in (ROOT / "runtime").glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert len(loose) <= 12, sorted(loose)


def test_every_step_module_registers_through_the_package_and_no_kind_inherits_another():
    """CONTRIBUTING's recipe for a step kind: one module in runtime/steps/ and its name in the package's
    import line. Kinds declare what they do (`reshaping`, `finetunes`); none subclasses another kind."""
    from runtime.steps import REGISTRY, StepKind

    declared = set()
    for path in (ROOT / "runtime" / "steps").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            registered = any(getattr(d, "id", None) == "register" for d in getattr(node, "decorator_list", ()))
            if isinstance(node, ast.ClassDef) and registered:
                kind = next(s.value.value for s in node.body if isinstance(s, ast.Assign)
                            and getattr(s.targets[0], "id", None) == "kind")
                declared.add(kind)
    assert declared == set(REGISTRY), f"registered in a module the package does not import: {declared - set(REGISTRY)}"
    for kind in REGISTRY.values():
        assert type(kind).__bases__ == (StepKind,), f"{type(kind).__name__} inherits {type(kind).__bases__}"
