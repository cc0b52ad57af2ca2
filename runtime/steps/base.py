"""The step plug-in interface.

A step kind is a pydantic config class plus the code that runs it, registered by
name with `@register`. The runner only talks to this interface, so new kinds
(quantize, prune, lowrank, ...) plug in by adding a module to `runtime/steps/`.

Artifacts are model weights, named after the model they belong to (`student`,
`teacher`, ...): a step `needs` some and `produces` some; the runner checks before
any work starts that every needed artifact is produced by an earlier step or given
as a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar

from ..recipe import Strict, plain
from .finetune import finetune_needs, set_finetune_epochs

if TYPE_CHECKING:
    from ..train.context import RunContext


class StepConfig(Strict):
    name: Annotated[str, plain("the step's name")]                # also its folder: steps/<name>/
    kind: str
    model: Annotated[str, plain("the step's model")] = "student"  # which model the step works on


@dataclass
class StepResult:
    model_file: Path | None = None               # weights this step wrote for cfg.model (its artifact)
    spec_file: Path | None = None                # a new spec for cfg.model (steps that change the architecture)
    metrics: dict = field(default_factory=dict)  # val_accuracy, val_loss, ...
    files: list[str] = field(default_factory=list)  # other outputs (PNG, CSV), relative to the run dir


class StepKind:
    """A step kind declares what it does to its model; it never inherits another kind's code."""

    kind: ClassVar[str]
    config: ClassVar[type[StepConfig]]
    trains: ClassVar[bool] = False     # has epochs (the --epochs override applies)
    reshaping: ClassVar[bool] = False  # writes a new spec for its model (prune, lowrank)
    finetunes: ClassVar[bool] = False  # learns again after its change, as its `finetune` section says

    def needs(self, cfg) -> list[str]:
        """Model artifacts that must exist before this step runs."""
        return finetune_needs(cfg) if self.finetunes else []

    def produces(self, cfg) -> list[str]:
        return [cfg.model] if self.reshaping else []

    def check(self, cfg, models: dict, listing) -> list[str]:
        """Problems with this step's config that only show with the run's models and data (before any work)."""
        return []

    def skip_reason(self, cfg, models: dict) -> str | None:
        """Why this step need not run with these models (e.g. a checkpoint is given), or None."""
        return None

    def reshapes(self, cfg) -> bool:
        """Whether the step writes a new spec for its model (later steps see another architecture)."""
        return self.reshaping

    def predicted_budget_failures(self, cfg, model) -> list[str]:
        """The spec's budgets that the files this step writes will break, predicted from `model` (its
        spec as the recipe starts) before any work; the runner asks only while no step reshaped it."""
        return []

    def written_format(self, cfg, model):
        """The WeightFormat of the model file this step writes for `cfg.model`, known from the plan
        (`model`: the spec as the recipe starts), or None when the step writes none or it is unknown."""
        return None

    def plan_notes(self, cfg, model, fmt, classes: list[str], norm) -> list[str]:
        """Lines `--dry-run` prints under this step: what the plan already knows of its output.
        `fmt`: the format of `cfg.model`'s file when the step runs (None: unknown); `classes`: the
        data's class names; `norm`: the eval pipeline's normalization."""
        return []

    def set_epochs(self, raw: dict, epochs: int) -> None:
        """`--epochs N` on this step's raw config: every training setting it has."""
        if self.finetunes:
            set_finetune_epochs(self.config, raw, epochs)
        elif self.trains:
            raw["epochs"] = epochs

    def describe(self, cfg) -> str:
        return cfg.kind

    def run(self, cfg, ctx: "RunContext", key: str) -> StepResult:
        """Do the work. `key` hashes everything the step depends on; resumable steps
        store it with their partial progress and continue only when it matches."""
        raise NotImplementedError


REGISTRY: dict[str, StepKind] = {}


def register(cls: type[StepKind]) -> type[StepKind]:
    REGISTRY[cls.kind] = cls()
    return cls
