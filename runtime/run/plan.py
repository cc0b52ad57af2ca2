"""A recipe's steps, validated against the step kinds and the run's models: the typed plan.

The runner executes a `Plan` and knows no step kind by name: each kind says what it
needs and produces, whether it trains (so `--epochs` reaches it), when it may be
skipped, and what else it checks before any work.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from compiler.errors import did_you_mean

from ..recipe import Recipe, RecipeError, problems_of, read_recipe, validate_recipe
from ..steps import REGISTRY, StepConfig, StepKind


@dataclass(frozen=True)
class PlannedStep:
    config: StepConfig
    kind: StepKind
    skip: str | None = None      # why the step will not run (e.g. "checkpoint given"), or None

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    path: Path
    steps: tuple[PlannedStep, ...]
    budget_failures: tuple[str, ...] = ()  # budgets the steps' files will break, predicted before any work


def load(name_or_path: str, overrides: list[str] = (), epochs: int | None = None
         ) -> tuple[Recipe, list[StepConfig], Path]:
    """Read, override and validate a recipe and its steps; every problem at once, by field."""
    raw, path = read_recipe(name_or_path, overrides)
    if epochs is not None:
        for step in raw.get("steps") or []:
            kind = REGISTRY.get(step.get("kind")) if isinstance(step, dict) else None
            if kind is not None:
                kind.set_epochs(step, epochs)
    raw_steps, problems = raw.get("steps"), []
    if raw_steps is not None and not isinstance(raw_steps, list):  # said once, here, not again by pydantic
        problems.append(f"`steps` must be a list of steps, got {type(raw_steps).__name__}")
        raw, raw_steps = {**raw, "steps": []}, None
    recipe, shared_problems = validate_recipe(raw)  # a missing `steps` is one of these
    problems += shared_problems
    steps, names = [], set()
    for i, step in enumerate(raw_steps or []):
        label = f"steps[{i}]"
        if not isinstance(step, dict):
            problems.append(f"`{label}` must be a mapping with `name` and `kind`")
            continue
        kind = step.get("kind")
        if not isinstance(kind, str) or kind not in REGISTRY:
            hint = did_you_mean(str(kind), REGISTRY)
            problems.append(f"`{label}.kind`: unknown step kind `{kind}`" + (f"; {hint}" if hint else "")
                            + f" (known: {', '.join(sorted(REGISTRY))})")
            continue
        try:
            cfg = REGISTRY[kind].config.model_validate(step)
        except ValidationError as err:
            problems += problems_of(err, raw, REGISTRY[kind].config, ("steps", i))
            continue
        if cfg.name in names:
            problems.append(f"`{label}.name`: step name `{cfg.name}` is used twice")
        names.add(cfg.name)
        steps.append(cfg)
    if raw_steps == []:
        problems.append("`steps`: a recipe needs at least one step")
    if problems:
        raise RecipeError(str(path), problems)
    return recipe, steps, path


def make_plan(recipe: Recipe, path: Path, steps: list[StepConfig], models: dict, listing) -> Plan:
    """Which model weights exist when; every problem at once, before any work."""
    problems: list[str] = []
    # weights exist from the start: a checkpoint, or pretrained torchvision weights
    available = {n for n, s in models.items() if s.weights is not None or s.torchvision_weights
                 or s.torchvision_state}
    planned, over_budget, reshaped = [], [], set()
    for cfg in steps:
        kind = REGISTRY[cfg.kind]
        if cfg.model not in models:
            hint = did_you_mean(cfg.model, models)
            problems.append(f"step `{cfg.name}` works on model `{cfg.model}`, which the recipe does not define"
                            + (f"; {hint}" if hint else "") + f" (models: {', '.join(models)})")
            continue
        skip = kind.skip_reason(cfg, models)
        for need in kind.needs(cfg):
            if need not in models:
                problems.append(f"step `{cfg.name}` needs model `{need}`, which the recipe does not define")
            elif need not in available:
                problems.append(f"step `{cfg.name}` needs `{need}` weights, which no earlier step produces"
                                f"\n  hint: add a train step for `{need}` before it, or give models.{need}.checkpoint")
        found = kind.check(cfg, models, listing)
        problems += found
        if skip is None:
            if not found and cfg.model not in reshaped:
                over_budget += kind.predicted_budget_failures(cfg, models[cfg.model].model)
            if kind.reshapes(cfg):
                reshaped.add(cfg.model)
            available |= set(kind.produces(cfg))
        planned.append(PlannedStep(cfg, kind, skip))
    if problems:
        raise RecipeError(str(path), problems)
    return Plan(recipe, path, tuple(planned), tuple(over_budget))
