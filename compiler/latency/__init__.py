"""Latency predicted from the spec, without torch: the model as units, each looked up in a table that
`nccompile profile` measured on the target machine.

A unit is what a runtime runs as one piece: a conv or linear with the BatchNorm and activation that
follow it (ONNX Runtime fuses them into one kernel), a pool, a residual's add, a join. Its key is its
layers as DSL text at its input shape, so the profiler compiles each unit as a one-unit spec and times
it. On ONNX Runtime a unit's time is its kernels' time under ORT's profiler, net of the profiler's own
floor and of the layout reorders a unit alone pays; the whole models the profiler measures also run
under it and give each unit its time inside them (node names are layer paths, so fused kernels map back
to units), which is the unit's entry where known. On ort-int8 the model's first conv is a unit of its
own (`[float]`): the int8 file keeps it in float. Prediction = overhead + per_unit x units + scale x
(sum of the units' entries): the overhead is the empty model's measured time (a constant plus a cost per
input element), per_unit and scale are fitted by the profiler on the whole models, as is a cost per weight
of the units timed alone in a model large enough to evict its weights between runs (cold_weights).

A unit the table lacks takes the nearest measured unit of the same structure (the key with every
number masked) by MACs and bytes moved, moved along that structure's cost per MAC and per element moved
(fitted over its measured units; with fewer than 4 of them, scaled by the ratio of MACs, or of bytes
moved for units without MACs); with no unit of that structure the prediction is refused and says to
profile the spec.
"""
from __future__ import annotations

from .predict import (
    IN_MODEL,
    Prediction,
    cold_weights,
    entry_ms,
    in_context,
    overhead_at,
    overhead_ms,
    per_unit_counts,
    predict,
    scaled_sum,
    scales,
    units_on,
)
from .predict import _slopes as _slopes  # tests check the fitted slopes
from .tables import (
    ALIASES,
    COLD_ABOVE_CANDIDATES,
    RAW_UNIT_INPUTS,
    SCALE_ABOVE_CANDIDATES,
    SETTINGS,
    SMALL_UNIT_INPUTS,
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

__all__ = ["ALIASES", "COLD_ABOVE_CANDIDATES", "RAW_UNIT_INPUTS", "SETTINGS", "SCALE_ABOVE_CANDIDATES",
           "SMALL_UNIT_INPUTS", "TARGETS", "LatencyError", "Prediction", "Table", "Unit", "baseline_spec",
           "cached_table", "IN_MODEL", "canonical_target", "cold_weights", "entry_ms", "in_context",
           "library_version", "load_table", "machine", "overhead_at", "overhead_ms", "per_unit_counts", "predict",
           "scaled_sum", "scales", "table_path", "units", "units_on"]
