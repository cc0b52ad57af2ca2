"""Measuring in the machine's fast state. A shared VM runs in spells: on a 2-core Intel VM the student at
64 px took 0.24 ms in some spells and 0.37-0.47 ms in others, lasting seconds, and an empty model's call
moved with it (7.5 us against 12-14 us; correlation 0.88 over 40 pairs, where a NumPy sort's moved
with neither). So a probe, the target's empty model, is timed around each measurement; one taken while
the probe ran over GATE times its fastest is re-taken in a later pass, and a measurement from a fast
spell is kept over any from a slow one."""
from __future__ import annotations

import math

GATE = 1.25  # a probe this much over its fastest: a slow spell (the two spells were 1.6-1.8x apart)
PROBE_SHAPE = (4, 8, 4)
PROBE_SAMPLES = 3


class Steadiness:
    """The probe for `target`: its runtime's empty model at PROBE_SHAPE (ORT's float session for both ORT
    targets), and the fastest it has run."""

    def __init__(self, target: str, threads: int, batch: int, call=None):
        if call is None:
            import compiler
            from compiler import latency

            from .measure import TIMERS

            empty = compiler.compile_source(latency.baseline_spec(PROBE_SHAPE), "probe")
            call = TIMERS["ort-fp32" if target.startswith("ort") else target](empty, threads, batch)
        self._call = call
        self.fastest = math.inf

    def now(self) -> float:
        """The probe's time now (ms)."""
        from .measure import median_ms

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
