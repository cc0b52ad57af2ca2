"""Latency predicted from the spec, without torch: the model as units, each looked up in a table that
`nccompile profile` measured on the target machine.

A unit is what a runtime runs as one piece: a conv or linear with the BatchNorm and activation that
follow it (ONNX Runtime fuses them into one kernel), a pool, a residual's add, a join. Its key is its
layers as DSL text at its input shape, so the profiler compiles each unit as a one-unit spec and times
it. On ONNX Runtime the profiler also runs the whole models it measures under ORT's own profiler and
gives each unit its time inside them (node names are layer paths, so fused kernels map back to units):
a unit's entry is its in-model time where known, else its time alone times its structure's in-model /
alone ratio. Prediction = overhead + per_unit x units + scale x (sum of the units' entries); the three
are fitted by the profiler on the whole models (session overhead, the profiler's own cost per node).

A unit the table lacks takes the nearest measured unit of the same structure (the key with every
number masked) by MACs and bytes moved, moved along that structure's cost per MAC and per element moved
(fitted over its measured units; with fewer than 4 of them, scaled by the ratio of MACs, or of bytes
moved for units without MACs); with no unit of that structure the prediction is refused and says to
profile the spec.
"""
from __future__ import annotations

from .predict import Prediction, context_ratio, entry_ms, in_context, predict
from .predict import _slopes as _slopes  # tests check the fitted slopes
from .tables import (
    ALIASES,
    TARGETS,
    LatencyError,
    Table,
    cached_table,
    canonical_target,
    library_version,
    load_table,
    machine,
    table_path,
)
from .units import Unit, baseline_spec, units

__all__ = ["ALIASES", "TARGETS", "LatencyError", "Prediction", "Table", "Unit", "baseline_spec", "cached_table",
           "canonical_target", "context_ratio", "entry_ms", "in_context", "library_version", "load_table",
           "machine", "predict", "table_path", "units"]
