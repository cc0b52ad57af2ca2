"""A study file: which runs to compare (explicit, a grid, or a search over a spec's space).

```yaml
name: q2_kd
spec: ../student.spec            # defaults for every run; paths resolve against the study file
recipe: kd
set: {data.batch_size: 64}       # recipe overrides for every run (as --set)
share_steps: true                # a step with the same inputs as another run's runs once (runtime.run.stepcache)
runs:                            # explicit runs
  - {name: scratch, recipe: scratch}
  - {name: kd}
grid:                            # the cartesian product of params and set values
  name: kd
  params: {base: [8, 16]}
  set: {steps.distill.temperature: [4, 20]}
search:                          # Optuna over the spec's search space (`base: int = 16 in 8..64 step 8`)
  spec: ../student_space.spec
  recipe: kd_wq
  trials: 8
  sampler: tpe                   # tpe | random | grid
  pruner: median                 # none | median | halving (early stopping from per-epoch validation)
  objective: {step: quantize, metric: val_accuracy}
```

Every problem is reported with its place (`runs[1].recipe`), all at once, before any trial runs.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from compiler.errors import FileProblems, NcError
from compiler.limits import limit, read_yaml

from ..recipe import SEED_END, Strict, plain, problems_of

Value = Any


class StudyError(FileProblems):
    """A study file that cannot run: every problem with its place."""


class RunConfig(Strict):
    name: Annotated[str, plain("a run's name")]
    spec: str | None = None
    recipe: str | None = None
    params: dict[str, Value] = {}
    set: dict[str, Value] = {}



class GridConfig(Strict):
    name: Annotated[str, plain("the grid's name")] = "grid"
    spec: str | None = None
    recipe: str | None = None
    params: dict[str, list[Value]] = {}
    set: dict[str, list[Value]] = {}



class Objective(Strict):
    step: str                                  # a step of the recipe, by name
    metric: Literal["val_accuracy"] = "val_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"


class SearchConfig(Strict):
    name: Annotated[str, plain("the search's name")] = "search"  # names its trials' folders
    spec: str | None = None
    recipe: str | None = None
    trials: int = Field(8, ge=1)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["none", "median", "halving"] = "none"
    objective: Objective
    seed: int = Field(0, ge=0, lt=SEED_END)
    params: dict[str, Value] = {}              # fixed values of some parameters
    set: dict[str, Value] = {}



class StudyConfig(Strict):
    name: Annotated[str, plain("the study's name")]
    description: str = ""
    spec: str | None = None
    recipe: str | None = None
    data: str | None = None
    set: dict[str, Value] = {}
    runs: list[RunConfig] = []
    grid: GridConfig | None = None
    search: SearchConfig | None = None
    share_steps: bool = True  # a step with the same inputs as another run's (a teacher) runs once



@dataclass
class Trial:
    """One run of the study: a spec, its parameters, a recipe and its overrides."""

    name: str
    where: str                                 # its place in the study file, for errors
    spec: Path
    recipe: str
    params: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)

    def set_strings(self, extra: tuple = ()) -> tuple[str, ...]:
        return tuple(f"{k}={_text(v)}" for k, v in self.sets.items()) + tuple(extra)

    def param_strings(self) -> dict[str, str]:
        return {k: _text(v) for k, v in self.params.items()}


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _label(v) -> str:
    return str(v).replace(".", "p").replace("/", "-").replace(" ", "")


def load_study(path: str | Path) -> tuple[StudyConfig, Path]:
    path = Path(path)
    if not path.exists():
        raise NcError(f"{path}: no such study file\n  hint: see specs/studies/ for examples")
    raw = read_yaml(path, "study file", "study_bytes", StudyError)
    if not isinstance(raw, dict):
        raise StudyError(str(path), ["a study is a mapping with `name` and `runs`, `grid` or `search`"])
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise StudyError(str(path), problems_of(err, raw, StudyConfig)) from None
    if not (cfg.runs or cfg.grid or cfg.search):
        raise StudyError(str(path), ["nothing to run: give `runs`, `grid` or `search`"])
    return cfg, path


def _resolve(value: str | None, default: str | None, base: Path, where: str, what: str, problems: list) -> str | None:
    chosen = value or default
    if chosen is None:
        problems.append(f"{where}.{what}: missing (give it here or at the top of the study)")
        return None
    if what == "spec" or "/" in chosen or chosen.endswith((".yaml", ".yml")):
        p = (base / chosen) if not Path(chosen).is_absolute() else Path(chosen)
        if not p.is_file():
            problems.append(f"{where}.{what}: no such file {chosen} (relative to {base})")
            return None
        return str(p.resolve())
    return chosen  # a built-in recipe name; the runner checks it


def fixed_trials(cfg: StudyConfig, base: Path, problems: list[str]) -> list[Trial]:
    """The explicit runs and the grid's points, in order, with unique names."""
    trials = []
    for i, r in enumerate(cfg.runs):
        where = f"runs[{i}] ({r.name})"
        spec = _resolve(r.spec, cfg.spec, base, where, "spec", problems)
        recipe = _resolve(r.recipe, cfg.recipe, base, where, "recipe", problems)
        if spec and recipe:
            trials.append(Trial(r.name, where, Path(spec), recipe, dict(r.params), {**cfg.set, **r.set}))
    if cfg.grid is not None:
        g = cfg.grid
        spec = _resolve(g.spec, cfg.spec, base, "grid", "spec", problems)
        recipe = _resolve(g.recipe, cfg.recipe, base, "grid", "recipe", problems)
        axes = [("params", k, v) for k, v in g.params.items()] + [("set", k, v) for k, v in g.set.items()]
        for kind, key, values in axes:
            if not values:
                problems.append(f"grid.{kind}.{key}: an empty list of values")
        points = math.prod(len(v) for _, _, v in axes)
        if points > limit("study_trials"):
            problems.append(f"grid: {' x '.join(str(len(v)) for _, _, v in axes)} = {points:,} points, over the limit "
                            f"of {limit('study_trials'):,} runs\n  hint: fewer values per axis, or a `search` "
                            "that draws a number of trials (NCCOMPILE_LIMIT_STUDY_TRIALS raises the limit)")
        elif spec and recipe and all(v for _, _, v in axes):
            for combo in itertools.product(*[v for _, _, v in axes]):
                params = {k: v for (kind, k, _), v in zip(axes, combo) if kind == "params"}
                sets = {k: v for (kind, k, _), v in zip(axes, combo) if kind == "set"}
                name = "-".join([g.name] + [f"{k.split('.')[-1]}{_label(v)}" for (_, k, _), v in zip(axes, combo)])
                trials.append(Trial(name, f"grid point {name}", Path(spec), recipe, params, {**cfg.set, **sets}))
    seen = set()
    for t in trials:
        if t.name in seen:
            problems.append(f"{t.where}: the name `{t.name}` is used twice")
        seen.add(t.name)
    return trials


def search_trial(cfg: StudyConfig, base: Path, problems: list[str]) -> Trial | None:
    """The search's template: its spec and recipe, and the fixed parameters; trials add the drawn ones."""
    s = cfg.search
    if s is None:
        return None
    spec = _resolve(s.spec, cfg.spec, base, "search", "spec", problems)
    recipe = _resolve(s.recipe, cfg.recipe, base, "search", "recipe", problems)
    if not (spec and recipe):
        return None
    return Trial(s.name, "search", Path(spec), recipe, dict(s.params), {**cfg.set, **s.set})
