"""Step kinds, registered by name. Importing this package registers the built-in ones."""
from . import evaluate, export, lowrank, prune, quantize, train  # noqa: F401  (registration)
from .base import REGISTRY, StepConfig, StepKind, StepResult, register

__all__ = ["REGISTRY", "StepConfig", "StepKind", "StepResult", "register"]
