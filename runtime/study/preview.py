"""`nccompile study S.yaml --dry-run`: what a study would run, from a validated Study, before any
training and without writing anything (no storage is opened): each run with its verdict on the
budgets, and a search's space with how many of its configurations meet them (from the spec alone)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from compiler.errors import NcError

from .config import Trial
from .engine import Study

EXHAUSTIVE = 20_000  # configurations counted one by one (about 1 ms each); past that, a seeded sample
SAMPLE = 2_000


def _values(values: list) -> str:
    """A parameter's values, as a range when they are evenly spaced numbers."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numbers and len(values) > 3:
        steps = {round(b - a, 12) for a, b in zip(values, values[1:])}
        if len(steps) == 1:
            return f"{values[0]}..{values[-1]} step {steps.pop():g} ({len(values)} values)"
    return "[" + ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values) + "]"  # as specs write


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _search_budgets(study: Study) -> str:
    """How many of the space's configurations meet every budget, as the search checks each draw."""
    from compiler.search import search

    t = study.template
    sampled = study.points > EXHAUSTIVE
    try:  # the study counted small spaces already, as it checked them
        result = study.counted if study.counted is not None and not sampled else search(
            t.spec, fixed={**study.search_fixed, **t.param_strings()}, input_shape=study.search_input,
            samples=SAMPLE if sampled else None, seed=study.cfg.search.seed, max_exhaustive=EXHAUSTIVE)
    except NcError as err:
        return f"budgets not counted: {str(err).splitlines()[0]}"
    ok, evaluated = len(result.candidates), result.evaluated
    if sampled:
        return (f"about {ok / evaluated:.1%} meet every budget ({ok:,} of {evaluated:,} drawn); "
                "the rest are rejected without training")
    text = f"{ok:,} meet every budget, {result.rejected:,} break one (rejected without training)"
    return text + (f", {result.invalid:,} do not build" if result.invalid else "")


def _keys(study: Study, trial: Trial, prepared: tuple | None = None) -> dict[str, str]:
    """step name -> its key, for the steps whose key is known before any work (`prepared`: the
    runner's preparation of the trial, if the study made it already)."""
    from ..run.runner import prepare
    from ..run.stepkeys import planned_keys

    try:
        prepared = prepared or prepare(study.options(trial))
    except NcError:  # a run over budget is rejected, not run: it shares nothing
        return {}
    recipe, _, listing, slots, plan, _ = prepared
    keys = planned_keys(recipe, plan, slots, listing, slots["student"].model.input_shape)
    return {step.config.name: key for step, key in zip(plan.steps, keys) if key is not None}


def _sharing(study: Study) -> list[str]:
    """The steps that will run once for several runs (the rest link them: runtime.run.stepcache)."""
    if not study.cfg.share_steps:
        return ["steps: every run trains its own (share_steps: false)"]
    users: dict[tuple[str, str], list[str]] = {}  # (key, step) -> the runs that have it
    for t in study.fixed:
        for step, key in _keys(study, t, study.prepared.get(t.name)).items():
            users.setdefault((key, step), []).append(t.name)
    if study.template is not None and study.space:
        t = study.template
        other = {n: v[-1] if v[0] == t.params.get(n) else v[0] for n, v in study.space.items()}
        at_defaults, elsewhere = _keys(study, t), _keys(study, replace(t, params={**t.params, **other}))
        for step, key in at_defaults.items():
            if elsewhere.get(step) == key:  # the same whatever the draw: every search trial has it
                users.setdefault((key, step), []).append("every search trial")
    shared = [(step, runs) for (_, step), runs in users.items()
              if len(runs) > 1 or runs == ["every search trial"]]
    if not shared:
        return ["steps: no step is the same in two runs (each trains its own)"]
    return ["steps run once and shared (the other runs link them):"] + [
        f"  {step}: {', '.join(runs)}" for step, runs in shared]


def preview(study: Study) -> list[str]:
    cfg = study.cfg
    lines = [f"study {cfg.name}" + (f": {cfg.description}" if cfg.description else "")]
    lines.append("data: " + (study.data or "scikit-learn digits (the default)")
                 + "; epochs: " + (str(study.epochs) if study.epochs is not None else "the recipes'")
                 + "".join(f"; --set {s}" for s in study.sets))
    if study.fixed:
        lines.append(f"runs ({len(study.fixed)}), each an ordinary nccompile run:")
        width = max(len(t.name) for t in study.fixed)
        for t in study.fixed:
            rejected = study.rejected_fixed.get(t.name)
            what = " ".join([_shown(t.spec), f"recipe {t.recipe}",
                             *(f"{k}={v}" for k, v in t.param_strings().items()), *t.set_strings()])
            lines.append(f"  {t.name:<{width}}  {what}")
            if rejected:
                lines.append(f"  {'':<{width}}  rejected before training: {rejected}")
    if study.template is not None:
        s, t = cfg.search, study.template
        lines.append(f"search: {study.trials_wanted:,} trial(s) of {_shown(t.spec)} with recipe {t.recipe}, "
                     f"{s.sampler} sampler (seed {s.seed}), pruner {s.pruner}, "
                     f"{s.objective.direction} {s.objective.step}.{s.objective.metric}")
        for name, values in study.space.items():
            lines.append(f"  {name}: {_values(values)}")
        lines.append(f"  {study.points:,} configuration(s); {_search_budgets(study)}")
    lines += _sharing(study)
    state = " (exists: finished trials are kept, the rest resume)" if study.out.exists() else ""
    lines.append(f"outputs: {study.out}{state}")
    lines.append("nothing was trained or written (--dry-run)")
    return lines
