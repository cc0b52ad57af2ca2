"""Measuring in the machine's fast state. A shared VM runs in spells: on a 2-core Intel VM the student at
64 px took 0.24 ms in some spells and 0.37-0.47 ms in others, lasting seconds, and an empty model's call
moved with it (7.5 us against 12-14 us; correlation 0.88 over 40 pairs, where a NumPy sort's moved
with neither). So a probe, the target's empty model, is timed around each measurement; one taken while
the probe ran over GATE times its fastest is re-taken in a later pass, and a measurement from a fast
spell is kept over any from a slow one.

Units only, and on ONNX Runtime only. In four pairs of profiles of the same 25 models (int8, float), the
probe put the units' two times closer in all four (median |log| ratio 31-57% against 51-69% without).
Whole models keep their fastest round (rounds.py): picked by the probe, two int8 profiles measured them
47.6% apart, against 10.0%. On PyTorch the probe (its empty module's call, Python's own work) did not
tell the spells apart: units 11% apart with it, 8% without (BENCHMARKS.md)."""
from __future__ import annotations

import math

GATE = 1.25  # a probe this much over its fastest: a slow spell (the two spells were 1.6-1.8x apart)
PROBED = {"ort-fp32": "ort-fp32", "ort-int8": "ort-fp32"}  # target -> its probe's (an int8 file of no layer is
# nothing to time: ORT's float session)
PROBE_SHAPE = (4, 8, 4)
PROBE_SAMPLES = 3


class Steadiness:
    """The probe for `target` (PROBED): its runtime's empty model at PROBE_SHAPE, and the fastest it has
    run. A target without a probe has every measurement taken as from a fast spell."""

    def __init__(self, target: str, threads: int, batch: int, call=None):
        if call is None and target in PROBED:
            import compiler
            from compiler import latency

            from .measure import TIMERS

            empty = compiler.compile_source(latency.baseline_spec(PROBE_SHAPE), "probe")
            call = TIMERS[PROBED[target]](empty, threads, batch)
        self._call = call
        self.fastest = math.inf

    def now(self) -> float:
        """The probe's time now (ms); 0 without a probe."""
        from .measure import median_ms

        if self._call is None:
            return 0.0
        ms = median_ms(self._call, PROBE_SAMPLES, warmup=3)
        self.fastest = min(self.fastest, ms)
        return ms

    def around(self, measure, *args, **kwargs):
        """(measure(*args, **kwargs), the slower of the probe right before and right after it)."""
        before = self.now()
        value = measure(*args, **kwargs)
        return value, max(before, self.now())

    def slow(self, probe: float) -> bool:
        """Whether a measurement with this probe was taken in a slow spell, against the fastest seen yet."""
        return probe > GATE * self.fastest

    def better(self, new: tuple[float, float], old: tuple[float, float] | None) -> bool:
        """Whether (ms, probe) `new` is kept over `old`: one from a fast spell over one from a slow spell,
        else the faster."""
        if old is None:
            return True
        return (self.slow(new[1]), new[0]) < (self.slow(old[1]), old[0])
