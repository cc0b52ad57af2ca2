"""A step's key: a digest of everything its result depends on. A run skips a step it finished under
the same key (resume), and a study's runs share a step published under the same key
(runtime.run.stepcache); `study --dry-run` plans the keys before any work to say what will be shared."""
from __future__ import annotations

import copy

from ..rundir import digest
from .plan import Plan


def step_key(shared: dict, step, models: dict, fingerprint: str, input_shape) -> str:
    """What a step's result depends on, digested: the recipe's shared settings, the step's config, the
    data, the training input, and the models it reads (spec, parameters, what produced their weights;
    another model's spec changes nothing). A step finished under the same key is not run again."""
    read = [step.config.model, *step.kind.needs(step.config)]
    return digest(shared, step.config.model_dump(), {n: models[n].producer_key for n in read}, fingerprint,
                  input_shape, {n: (models[n].model.source, models[n].model.params) for n in read})


def shared_settings(recipe) -> dict:
    return recipe.model_dump(exclude={"steps", "name", "description"})


def planned_keys(recipe, plan: Plan, slots: dict, listing, input_shape) -> list[str | None]:
    """Each step's key as the run will compute it, known before any work except after a step that
    reshapes a model the step reads (the new spec exists once that step has run): None there."""
    shared, models = shared_settings(recipe), {n: copy.copy(s) for n, s in slots.items()}
    unknown, keys = set(), []
    for step in plan.steps:
        cfg, kind = step.config, step.kind
        if step.skip or unknown & {cfg.model, *kind.needs(cfg)}:
            keys.append(None)
            continue
        keys.append(step_key(shared, step, models, listing.fingerprint, input_shape))
        for name in kind.produces(cfg):
            models[name].producer_key = keys[-1]
        if kind.reshapes(cfg):
            unknown.add(cfg.model)
    return keys
