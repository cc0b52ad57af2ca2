"""Rounds over the whole models a profile measures: their latency (the fit's calibration) and, on ONNX
Runtime, their units' in-model times from its profiler."""
from __future__ import annotations

from compiler import latency

from .steady import Steadiness


def label(model) -> str:
    return f"{model.name}@{'x'.join(map(str, model.input_shape))}"


class Rounds:
    """Each round times every model and the empty model at each input shape once (the median of
    `samples`, the models taking turns, the probe between them), and on ORT profiles each model for its
    units' in-model times (ctx), `profiles` times. A model's latency is its fastest round: keeping the
    round of a fast spell by the probe (steady.py) instead put two int8 profiles of the same models 47.6%
    apart, against 10.0% so. But a model no round of which met a fast spell is timed again (`settle`):
    a slow spell lasts seconds and catches the models timed in them, and in one int8 run 31 random specs
    in a row read 1.5x their time in all three rounds (random1-21: 33.0 us, 21.0 us in fast spells).
    A model's units take their ctx from one of its profiles, the fastest in sum, one from a fast spell
    over one from a slow one, as units alone are timed (steady.py).
    """

    def __init__(self, table: latency.Table, samples: int, state: Steadiness, profiles: int):
        self.table, self.samples, self.state, self.profiles = table, samples, state, profiles
        self.done = 0
        self.times: dict = {}  # model label or input shape -> each round's ms: how far the machine moved it
        self.probes: dict = {}  # ... -> each round's probe around it
        self.profiled: dict[str, list] = {}  # model label -> [profiles taken, the kept one's probe, its sum]

    @property
    def best(self) -> dict:
        return {key: min(times) for key, times in self.times.items()}

    def settle(self, whole: list, rounds: int, most: int) -> None:
        """Rounds over `whole` until `rounds` are done, then rounds over the models (and empty models) no
        round of which met a fast spell, until none is left or `most` rounds are done."""
        while self.done < rounds:
            self.run(whole)
        while self.done < most:
            models = [m for m in whole if self._unsettled(label(m))]
            shapes = [s for s in dict.fromkeys(m.input_shape for m in whole) if self._unsettled(s)]
            if not models and not shapes:
                return
            self.run(models, shapes)

    def _unsettled(self, key) -> bool:
        return self.state.slow(min(self.probes[key]))

    def run(self, whole: list, shapes: list | None = None) -> None:
        """One round over `whole` and the empty models at `shapes` (default: the models' input shapes)."""
        from tqdm import tqdm

        import compiler

        from .measure import KERNEL_TIMES, round_ms

        t = self.table
        shapes = list(dict.fromkeys(m.input_shape for m in whole)) if shapes is None else shapes
        if not whole and not shapes:
            return
        empties = [compiler.compile_source(latency.baseline_spec(s), "empty") for s in shapes]
        with tqdm(total=len(whole) + len(empties), desc=f"whole models, round {self.done + 1}", unit="run",
                  mininterval=0.5, leave=False) as bar:
            times = round_ms(whole + empties, t.target, t.threads, t.batch, self.samples, self.state.now,
                             progress=bar.update)
        for key, (ms, probe) in zip([label(m) for m in whole] + shapes, times):
            self.times.setdefault(key, []).append(round(ms, 6))
            self.probes.setdefault(key, []).append(probe)
        self.done += 1
        if t.target in KERNEL_TIMES and self.profiles:
            self._profile([m for m in whole if self._wants_profile(label(m))])

    def _wants_profile(self, name: str) -> bool:
        done, probe, _ = self.profiled.get(name, (0, 0.0, 0.0))
        return done < self.profiles or (self.state.slow(probe) and done < self.profiles + 2)

    def _profile(self, models: list) -> None:
        from tqdm import tqdm

        from .measure import ort_node_ms

        t = self.table
        for model in tqdm(models, desc="in-model times", unit="model", mininterval=0.5, leave=False):
            name = label(model)
            nodes, probe = self.state.around(ort_node_ms, model, t.threads, t.batch, target=t.target)
            spent = attribute(model, nodes, t.target)
            done, kept_probe, kept_ms = self.profiled.get(name, (0, None, None))
            new = (sum(spent.values()), probe)
            if kept_probe is None or self.state.better(new, (kept_ms, kept_probe)):
                for key, ms in spent.items():  # the whole profile: a tiny node's net time is mostly noise,
                    t.entries[key].setdefault("ctx", {})[name] = ms  # and each unit's lowest would sum low
                kept_ms, kept_probe = new
            self.profiled[name] = [done + 1, kept_probe, kept_ms]


def attribute(model, node_ms: dict[str, float], target: str = "ort-fp32") -> dict[str, float]:
    """Each unit's share of the model's node times (summed over the units of the same key, divided by
    their count): a node is its unit's when its layer path (measure.node_path) is one of the unit's.
    What ORT adds between layouts stays with the fitted terms; a unit with no node left (fused into
    another's) spends 0."""
    from .measure import node_path

    units = latency.units_on(model, target)
    owner = {path: unit for unit in units for path in unit.paths}
    spent: dict[str, float] = {}
    for name, ms in node_ms.items():
        unit = owner.get(node_path(name))
        if unit is not None:
            spent[unit.key] = spent.get(unit.key, 0.0) + ms
    count: dict[str, int] = {}
    for unit in units:
        count[unit.key] = count.get(unit.key, 0) + 1
    # a unit without a node of its own was fused into another's (an add into its conv): 0 inside this model
    return {key: spent.get(key, 0.0) / n for key, n in count.items()}
