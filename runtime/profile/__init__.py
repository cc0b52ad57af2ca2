"""`nccompile profile`: measure, on this machine, the latency of the units that specs use, for one target,
into the table that `budget latency(TARGET)` reads (compiler.latency); `--check` compares its predictions
with whole models run for real.

The table is written after every few units, so an interrupted profile resumes where it stopped. The
whole models measured alongside give the units their in-model times (ONNX Runtime's profiler) and fit
the table's overhead, per-unit and scale terms (compiler.latency).
"""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path

from compiler import latency
from compiler.errors import NcError, UsageError

from ..files import atomic_write
from .rounds import Rounds, attribute  # noqa: F401 (tests)
from .rounds import label as _label
from .steady import GATE, Steadiness

SAVE_EVERY_S = 5.0
WHOLE_ROUNDS = 3  # whole models: the fastest of this many medians, the models taking turns ...
MAX_WHOLE_ROUNDS = 9  # ... then again those no round of which met a fast spell (rounds.py), up to this many
UNIT_PASSES = 2   # units: the faster of two medians, a pass over every unit apart (a shared machine's slow
# spells last seconds and slow 20% and more of what they catch) ...
MAX_UNIT_PASSES = 4  # ... then again those a slow spell caught both times (steady.py), up to this many passes
IN_MODEL_PASSES = 2  # ORT's profiler over each whole model: the lower of this many
STEP_CHAINS = (9, 18)  # ReLU chains timed whole: their difference is what a model pays per unit (KERNEL_TIMES)
STEP_ROUNDS = 7  # ... rounds from fast spells (steady.py), taken over at least STEP_MIN_S, at most STEP_MAX_S
STEP_MIN_S, STEP_MAX_S = 10.0, 60.0
SHIPPED = ("specs/student.spec", "specs/student_se.spec", "specs/student_4bit.spec", "specs/origin.spec",
           "specs/teacher.spec")
STUDENT_SIZES = (32, 64, 256)


def _parser():
    from ..usage import Parser

    p = Parser(prog="nccompile profile", description="Measure the latency of the layer configurations specs "
                                                       "use, on this machine, for `budget latency(TARGET)`; "
                                                       "or check the table's predictions against real runs.")
    p.add_argument("--target", default="ort-fp32", choices=[*latency.TARGETS, *latency.ALIASES],
                   help="ort-fp32: ONNX Runtime on the exported graph (ort-weights: the same kernels); "
                        "ort-int8: on the `format: int8` QDQ file; torch-fp32: PyTorch eager (default ort-fp32)")
    p.add_argument("--specs", nargs="+", metavar="SPEC", help="profile what these specs need (default: the "
                                                               "shipped specs and the zoo)")
    p.add_argument("--space", type=int, default=20, metavar="N",
                   help="for --specs with a search space, also N of its configurations, drawn as `nccompile "
                        "search --samples N` draws them (default 20; 0: the defaults only)")
    p.add_argument("--input", metavar="CxHxW", action="append", default=[],
                   help="the input size(s) to profile --specs at (default: each spec's own)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="intra-op threads (default 1)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="images per inference (default 1)")
    p.add_argument("--table", metavar="PATH", help="the table file (default: TARGET.json in "
                                                    "$NCCOMPILE_LATENCY_DIR, else ~/.cache/nccompile/latency; "
                                                    "budgets read it there)")
    p.add_argument("--samples", type=int, default=15, metavar="N", help="timed samples per unit (default 15)")
    p.add_argument("--fresh", action="store_true", help="measure everything again")
    p.add_argument("--check", nargs="+", metavar="SPEC", help="run these specs for real and print predicted "
                                                               "vs measured latency")
    return p


def _models(specs: list[str] | None, inputs: list[str], space: int = 0) -> list:
    """The models to profile: the given specs at the given inputs (and `space` configurations of their
    search spaces), or the default grid."""
    import compiler
    from compiler.space import configurations, spaces

    if specs:
        shapes = [compiler.parse_shape(t) for t in inputs] or [None]
        models = []
        for s in specs:
            for shape in shapes:
                model = compiler.compile_spec(s, input_shape=shape)
                models.append(model)
                searched = spaces(model.definition, model.params)
                drawn = configurations(searched, space, seed=0) if space and searched else []
                for params in drawn:
                    try:
                        models.append(compiler.compile_spec(s, params=params, input_shape=shape))
                    except NcError:  # a configuration that does not elaborate: search skips it too
                        continue
        return models
    root = Path(__file__).resolve().parents[2] / "specs"
    if not root.is_dir():  # installed: the specs ship as runtime._specs
        root = Path(__file__).resolve().parents[1] / "_specs"
    models = [compiler.compile_spec(root / "student.spec", input_shape=(3, n, n)) for n in STUDENT_SIZES]
    models += [compiler.compile_spec(root / Path(s).name) for s in SHIPPED]
    models += [compiler.compile_spec(p, input_shape=(3, 224, 224)) for p in sorted((root / "zoo").glob("*.spec"))]
    return models


def _inputs(model) -> int:
    import math

    return math.prod(model.input_shape)


def _fresh_table(path: Path, target: str, threads: int, batch: int) -> latency.Table:
    from .measure import timing_settings

    return latency.Table(path, target, threads, batch, latency.machine(),
                         {latency.TARGETS[target]: latency.library_version(target)},
                         settings=timing_settings(target))


def _open_table(path: Path, target: str, threads: int, batch: int, fresh: bool) -> latency.Table:
    """The table to add to: this one when it was measured here, under the same settings; else a new one."""
    if not fresh and path.is_file():
        try:
            old = latency.load_table(target, path)
        except latency.LatencyError as err:
            print(f"profile: measuring afresh: {str(err).splitlines()[0]}")
        else:
            if (old.threads, old.batch) == (threads, batch):
                return old
            print(f"profile: measuring afresh: {path} holds {old.threads} thread(s), batch {old.batch}")
    return _fresh_table(path, target, threads, batch)


def save(table: latency.Table) -> None:
    table.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(table.path, (json.dumps(table.to_json(), indent=1, sort_keys=True) + "\n").encode())


def fit(calibration: dict, per_unit: float | None = None) -> dict:
    """The prediction's terms from the whole models measured (each {sum_ms, alone_ms, units, moved,
    measured_ms, empty_ms, inputs}): the overhead is the empty model's time at each input size measured
    (`overhead_points`), and least squares over them as a constant plus a cost per input element (both
    >= 0) for larger inputs (latency.overhead_at); then measured - overhead = per_unit x units +
    scale x sum, least squares on the relative error, with `per_unit` the runtime's step between kernels
    (ORT's units are kernel times), measured. Units timed alone (`alone_ms`, the sum of the model's units'
    times alone) get terms of their own, `alone_scale` and `alone_per_unit_ms`, fitted the same way: a
    kernel costs otherwise alone than inside a model (an int8 unit alone 0.8-1.0x a model's share per
    unit, and about 1 us more per unit), and a model the table never ran whole is predicted from its
    units alone. Units up to RAW_UNIT_INPUTS input elements (`raw_ms`) are taken off first: their
    entries stand as they are.
    Without a step (PyTorch: a unit's entry is its whole cost alone, its module calls included), the
    second term is a cost per element the units move (`per_moved_ms`): inside a large model a unit finds
    less of its input and weights in the cache than alone. A per-unit term fitted there on the zoo put
    20-30 us on every unit, and tiny specs 2-3x over."""
    empties = {c["inputs"]: c["empty_ms"] for c in calibration.values() if "empty_ms" in c}
    a, b = _overhead(empties)
    terms = {"overhead_ms": a, "overhead_ms_per_input": b, "per_unit_ms": per_unit or 0.0,
             "overhead_points": [[n, ms] for n, ms in sorted(empties.items())]}
    net = [(c, c["measured_ms"] - latency.overhead_at(terms, c.get("inputs", 0))) for c in calibration.values()]
    if per_unit is None:  # every entry is a unit's time alone (no in-model times): one fit for both
        terms.update(_scaled_from(net))
        return {**terms, "alone_scale": terms["scale"], "alone_per_unit_ms": 0.0}
    # units up to RAW_UNIT_INPUTS enter at their time (`raw_*`), and the per-unit terms reach all the others;
    # in a calibration from before those were kept, the units over SMALL_UNIT_INPUTS (`units_above`, or every
    # unit before that): the in-model one where that fits the whole models better, the one alone always
    raw = all("raw_ms" in c for c in calibration.values())
    if raw:
        above = terms["raw_unit_inputs"] = latency.RAW_UNIT_INPUTS
    else:
        above = latency.SMALL_UNIT_INPUTS if all("units_above" in c for c in calibration.values()) else 0

    def reached(c: dict, threshold: int) -> int:
        if raw:
            return c["units"] - c["raw_units"]
        return c["units_above"] if threshold else c.get("units", 0)

    def rest(c: dict, m: float, alone: bool = False) -> float:  # what the fitted units took
        return m - per_unit * c.get("units", 0) - c.get("raw_alone_ms" if alone else "raw_ms", 0.0)

    fits = []
    for threshold in dict.fromkeys((above,) if raw else (0, above)):
        points = [(c["sum_ms"] - c.get("raw_ms", 0.0), reached(c, threshold), rest(c, m)) for c, m in net]
        found = _scaled(points)
        fits.append((_misfit(points, found), threshold, found))
    _, in_model_above, in_model = min(fits, key=lambda f: f[0])
    terms.update(scale=in_model["scale"], in_model_per_unit_ms=in_model["per_unit_ms"],
                 in_model_per_unit_above=in_model_above)
    if any("alone_ms" in c for c in calibration.values()):
        alone = _with_cold([(c["alone_ms"] - c.get("raw_alone_ms", 0.0), reached(c, above), rest(c, m, True), c)
                            for c, m in net if "alone_ms" in c])
    else:  # models measured before alone sums were kept
        alone = {"scale": terms["scale"], "per_unit_ms": 0.0}
    return {**terms, "alone_scale": alone["scale"], "alone_per_unit_ms": alone["per_unit_ms"],
            "alone_per_unit_above": above, **{k: alone[k] for k in ("cold_ms_per_weight", "cold_above") if k in alone}}


COLD_GAIN = 0.05  # the cold term enters where it takes at least this share off the misfit without it
WEIGHT_BOUND_MACS = 200  # a unit of at most this many MACs per weight: loading its weights is a visible
# share of its time (a 1x1 conv at 7x7 does 49, a linear 1), so its time inside a model less its time
# alone shows what reading them from memory costs


def _with_cold(points: list[tuple[float, float, float, dict]]) -> dict:
    """The terms of units alone (_scaled's, from (sum, units, time less the rest, calibration) of each
    model), and a cost per weight of theirs in models whose units move over `cold_above` elements: alone
    a unit runs with its weights in the cache, inside a large model they come from memory
    (latency.cold_weights). Both come from the table's own in-model times where the models hold them
    (_cold_from_units), else from the whole models (_cold_from_models)."""
    if not all("cold_excess_ms" in c for *_, c in points):  # a table from before they were kept
        return _cold_from_models(points)
    cold = _cold_from_units([c for *_, c in points])

    def paid(c: dict) -> float:  # what the model's units alone pay for their weights (none without the term)
        if not cold or c.get("moved", 0) <= cold["cold_above"]:
            return 0.0
        return cold["cold_ms_per_weight"] * c.get("weights", 0)

    return {**_scaled([(s, n, m - paid(c)) for s, n, m, c in points]), **cold}


def _cold_from_units(calibration: list[dict]) -> dict:
    """{cold_ms_per_weight, cold_above} from each model's weight-bound units (WEIGHT_BOUND_MACS): their
    time inside it less their time alone (`cold_excess_ms`), over their weights (`cold_weights`). The
    size is the one of COLD_ABOVE_CANDIDATES that explains those costs per weight best, one model one vote
    (least absolute misfit; a smaller size for a clear gain only), the cost the models' median over it (a
    few models' layers run otherwise inside them: ConvNeXt's linears took 10 ms less inside it than alone
    on ort-fp32); none where that takes less than COLD_GAIN off the misfit of no term."""
    rows = [(c["moved"], c["cold_excess_ms"] / c["cold_weights"]) for c in calibration if c.get("cold_weights")]
    best: tuple[float, dict] = (sum(abs(k) for _, k in rows), {})
    for above in sorted(latency.COLD_ABOVE_CANDIDATES, reverse=True):
        over = [k for moved, k in rows if moved > above]
        per_weight = statistics.median(over) if over else 0.0
        if per_weight <= 0:
            continue
        misfit = sum(abs(k - (per_weight if moved > above else 0.0)) for moved, k in rows)
        if misfit < best[0] * (1 - COLD_GAIN) - 1e-12:
            best = (misfit, {"cold_ms_per_weight": per_weight, "cold_above": above})
    return best[1]


def _cold_from_models(points: list[tuple[float, float, float, dict]]) -> dict:
    """_with_cold's terms fitted on the whole models alone (tables from before the in-model excesses were
    kept): the cost per weight a third term of the least squares, at the size that fits them best."""
    import numpy as np

    plain = _scaled([p[:3] for p in points])
    best = (_misfit([p[:3] for p in points], plain), plain)
    kept = [p for p in points if p[0] > 0 and p[2] > 0]
    for above in sorted(latency.COLD_ABOVE_CANDIDATES, reverse=True):  # a smaller size for a clear gain only
        cold = np.array([c.get("weights", 0) if c.get("moved", 0) > above else 0 for *_, c in kept], dtype=float)
        if len(kept) < 4 or not cold.any():
            continue
        s, n, m = (np.array(v, dtype=float) for v in zip(*(p[:3] for p in kept)))
        cols = np.stack([n / max(n.max(), 1.0), s, cold / cold.max()], 1) / m[:, None]
        (per_unit, scale, per_weight), _, rank, _ = np.linalg.lstsq(cols, np.ones_like(m), rcond=None)
        if rank < 3 or scale <= 0 or per_weight < 0:
            continue
        terms = {"per_unit_ms": float(per_unit / max(n.max(), 1.0)), "scale": float(scale),
                 "cold_ms_per_weight": float(per_weight / cold.max()), "cold_above": above}
        misfit = _rms([(terms["per_unit_ms"] * x + scale * y + terms["cold_ms_per_weight"] * w) / z - 1
                       for (y, x, z), w in zip(zip(s, n, m), cold)])
        if misfit < best[0] * (1 - COLD_GAIN) - 1e-9:  # a term and a size more: for a clear gain only
            best = (misfit, terms)
    return best[1]


def _scaled_from(net: list[tuple[dict, float]]) -> dict:
    """PyTorch's terms: time less the overhead = per_moved_ms x elements moved + scale x the entries of the
    units over `alone_scale_above` input elements + the others' entries, the threshold the one of
    SCALE_ABOVE_CANDIDATES that fits the whole models best (every unit scaled in a calibration from before
    the sums by size were kept). On the bench's VM it came out 0.70-0.83 over 65,536-262,144 elements:
    inside a model a large unit finds its input in the cache, and max pooling's branches run on smoother
    data."""
    found = []
    candidates = latency.SCALE_ABOVE_CANDIDATES if all("sum_above_ms" in c for c, _ in net) else (0,)
    for above in candidates:
        def over(c: dict, above: int = above) -> float:
            return c["sum_above_ms"][str(above)] if above else c["sum_ms"]

        points = [(over(c), c.get("moved", 0), m - (c["sum_ms"] - over(c))) for c, m in net]
        terms = _scaled(points, "per_moved_ms")
        errors = [(terms["per_moved_ms"] * c.get("moved", 0) + terms["scale"] * over(c) + c["sum_ms"] - over(c))
                  / m - 1 for c, m in net if c["sum_ms"] > 0 and m > 0]
        found.append((_rms(errors), {**terms, "alone_scale_above": above}))
    return min(found, key=lambda f: f[0])[1]


def _rms(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0


def _misfit(points: list[tuple[float, float, float]], terms: dict) -> float:
    """The root mean square relative error of _scaled's `terms` over its `points`."""
    return _rms([(terms["per_unit_ms"] * n + terms["scale"] * s) / m - 1 for s, n, m in points if s > 0 and m > 0])


def _scaled(points: list[tuple[float, float, float]], name: str = "per_unit_ms") -> dict:
    """{name, scale} from (sum of entries, x, time less the overhead) of each model, x the units or the
    elements moved: time = name x x + scale x sum, least squares on the relative error; the scale alone
    (`name` 0) where the two cannot be told apart or the scale comes out <= 0."""
    import numpy as np

    points = [p for p in points if p[0] > 0 and p[2] > 0]
    if not points:
        return {name: 0.0, "scale": 1.0}
    s, n, m = (np.array(v, dtype=float) for v in zip(*points))
    if len(points) >= 2 and n.max() > 0:
        unit = n.max()  # elements moved run to 1e8: columns of like size for the rank
        (fitted, scale), _, rank, _ = np.linalg.lstsq(np.stack([n / unit, s], 1) / m[:, None], np.ones_like(m),
                                                      rcond=None)
        if scale > 0 and rank == 2:  # models of one shape (x and sum in proportion) fit the scale alone
            return {name: float(fitted / unit), "scale": float(scale)}
    return {name: 0.0, "scale": float(np.sum(s / m) / np.sum((s / m) ** 2))}


def _overhead(empties: dict[int, float]) -> tuple[float, float]:
    """(constant, per input element) through the empty models' times, both kept >= 0."""
    import numpy as np

    if not empties:
        return 0.0, 0.0
    x, y = (np.array(v, dtype=float) for v in zip(*sorted(empties.items())))
    if len(x) >= 2:
        a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)[0]
        if a >= 0 and b >= 0:
            return float(a), float(b)
    return float(np.median(y)), 0.0


def profile(models: list, table: latency.Table, samples: int) -> tuple[int, int]:
    """Measure the units the models need and are not in the table yet, and the whole models; returns
    (units measured, units found in the table). A unit the target cannot run (a torchvision model has no
    ONNX form in nccompile's writer) is said and left out, with the whole models that use it.
    The whole models' rounds (and on ORT their profiled passes) come between the passes over the units,
    so that both meet the machine in the same states: run after all units, the whole models of one run
    here met a slow spell that put 10% on all of them and on nothing of their units. Each measurement
    has the probe around it (steady.py): units a slow spell caught are timed again, up to MAX_UNIT_PASSES."""
    from tqdm import tqdm

    import compiler

    from .measure import BLOCKED_LAYOUT, KERNEL_TIMES, ort_channel_block, unit_ms, unit_spec

    wanted: dict[str, latency.Unit] = {}
    for model in models:
        for unit in latency.units_on(model, table.target):
            wanted.setdefault(unit.key, unit)
    todo = [u for k, u in wanted.items() if k not in table.entries]
    state = Steadiness(table.target, table.threads, table.batch)
    if table.target in KERNEL_TIMES and (todo or "step_ms" not in table.fit):
        table.fit["step_ms"] = _step_ms(table, samples, state)  # measured: the fit takes it as the per-unit term
    saved = time.monotonic()
    empties: dict[tuple, object] = {}  # input shape -> the empty model timed beside each unit
    failed: dict[str, str] = {}
    rounds = Rounds(table, samples, state, IN_MODEL_PASSES)
    probes: dict[str, float] = {}  # unit key -> the probe around its kept measurement
    retimed: set[str] = set()
    bar = tqdm(total=UNIT_PASSES * len(todo), desc=f"profile {table.target}", unit="unit", mininterval=0.5)
    for p in range(MAX_UNIT_PASSES if todo else 0):
        # every unit UNIT_PASSES times, then again those whose kept measurement a slow spell caught
        batch = todo if p < UNIT_PASSES else [u for u in todo if state.slow(probes.get(u.key, 0.0))]
        if not batch:
            break
        if p >= UNIT_PASSES:
            bar.total += len(batch)
            bar.refresh()
            retimed.update(u.key for u in batch)
        # each pass in its own order: a slow spell then catches units of many models, not one model's
        # units, which a model's order times one after another (a tiny spec's PyTorch units 1.5x alone)
        for unit in random.Random(p).sample(batch, len(batch)):
            bar.update()
            if unit.key in failed:
                continue
            try:
                if unit.in_shape not in empties:
                    empties[unit.in_shape] = compiler.compile_source(latency.baseline_spec(unit.in_shape), "unit")
                model = compiler.compile_source(unit_spec(unit), "unit")
                timed, probe = state.around(unit_ms, model, empties[unit.in_shape], table.target, table.threads,
                                            table.batch, samples, unit.variant, table.fit.get("step_ms", 0.0))
            except (NcError, RuntimeError, ValueError) as err:  # ours, or ONNX Runtime's (export, quantization)
                failed[unit.key] = str(err).splitlines()[0]
                continue
            old = table.entries.get(unit.key) if p else None
            if old is None or state.better((timed["ms"], probe), (old["ms"], probes.get(unit.key, math.inf))):
                table.entries[unit.key] = {**(old or {}), **timed, "macs": unit.macs, "moved": unit.moved,
                                           "structure": unit.structure}  # in-model times (ctx) taken meanwhile stay
                probes[unit.key] = probe
            if time.monotonic() - saved > SAVE_EVERY_S:
                save(table)
                saved = time.monotonic()
        if p < UNIT_PASSES:
            rounds.run(_runnable(models, table, failed))  # between the passes: the machine's state then
    bar.close()
    if retimed:
        print(f"profile: {len(retimed)} units timed again, a slow spell of the machine having caught them "
              f"(the probe over {GATE}x its fastest)")
    for key, why in failed.items():
        print(f"profile: {key.split(' @ ')[0][:60]}: cannot run on {table.target} ({why}); left out")
    whole = _runnable(models, table, failed)
    rounds.settle(whole, WHOLE_ROUNDS, MAX_WHOLE_ROUNDS)
    if rounds.done > WHOLE_ROUNDS:
        print(f"profile: some whole models timed in up to {rounds.done} rounds, none of their first {WHOLE_ROUNDS} "
              f"having met the machine in a fast spell (the probe under {GATE}x its fastest)")
    if table.target in BLOCKED_LAYOUT:
        table.fit["channel_block"] = ort_channel_block()  # pruning to a latency rounds to it
    calibration = table.fit.setdefault("models", {})
    for model in whole:  # each model's input size first: a unit's in-context time is the nearest size's
        calibration.setdefault(_label(model), {})["inputs"] = _inputs(model)
    table.touch()  # units and in-model times added: what prediction derived from the entries is stale
    best, times = rounds.best, rounds.times
    for model in whole:
        calibration[_label(model)] = {
            **unit_sums(model, table), "measured_ms": best[_label(model)], "empty_ms": best[model.input_shape],
            "inputs": _inputs(model), "rounds_ms": times[_label(model)]}
    table.fit.update(fit(calibration, table.fit.get("step_ms")))
    save(table)
    return len(todo) - len(failed), len(wanted) - len(todo)


def unit_sums(model, table: latency.Table) -> dict:
    """What the fit needs of a model's units (their entries in context, as a prediction takes them): their
    sum, by the sizes a scale may start at (SCALE_ABOVE_CANDIDATES), alone, their count and how many are
    over SMALL_UNIT_INPUTS, the elements they move, and on the kernel-time targets the same of the units
    a fit does not reach (RAW_UNIT_INPUTS: `raw_ms`, `raw_alone_ms`, `raw_units`)."""
    from .measure import KERNEL_TIMES

    units = latency.units_on(model, table.target)
    entries = [(u, latency.entry_ms(u, table, _inputs(model))[0]) for u in units]
    sums = {"sum_ms": sum(ms for _, ms in entries),
            "sum_above_ms": {str(t): latency.scaled_sum(entries, t)[0] for t in latency.SCALE_ABOVE_CANDIDATES},
            "alone_ms": sum(table.entries[u.key]["ms"] for u in units), "units": len(units),
            "units_above": latency.per_unit_counts(units, latency.SMALL_UNIT_INPUTS),
            "moved": sum(u.moved for u in units), "weights": sum(u.weights for u in units),
            **_cold_excess(model, units, table)}
    if table.target in KERNEL_TIMES:
        raw = [(u, ms) for u, ms in entries if math.prod(u.in_shape) <= latency.RAW_UNIT_INPUTS]
        sums.update(raw_ms=sum(ms for _, ms in raw), raw_alone_ms=sum(table.entries[u.key]["ms"] for u, _ in raw),
                    raw_units=len(raw), weights=sums["weights"] - sum(u.weights for u, _ in raw))
    return sums


def _cold_excess(model, units: list, table: latency.Table) -> dict:
    """The model's weight-bound units (WEIGHT_BOUND_MACS) that the profiler timed inside it: their time there
    less their time alone (`cold_excess_ms`), and their weights (`cold_weights`)."""
    label, excess, weights = _label(model), 0.0, 0
    for u in units:
        ctx = table.entries[u.key].get("ctx") or {}
        if u.weights and label in ctx and u.macs <= WEIGHT_BOUND_MACS * u.weights:
            excess += ctx[label] - table.entries[u.key]["ms"]
            weights += u.weights
    return {"cold_excess_ms": excess, "cold_weights": weights}


def _runnable(models: list, table: latency.Table, failed: dict) -> list:
    """The distinct models none of whose units failed on the target."""
    return list({_label(m): m for m in models
                 if not any(u.key in failed for u in latency.units_on(m, table.target))}.values())


def _step_ms(table: latency.Table, samples: int, state: Steadiness) -> float:
    """On targets whose units are kernel times, what a model pays per unit beyond them: a chain of 18
    ReLUs on one value less a chain of 9, per ReLU, the two timed one right after the other, with the
    probe around them (steady.py); rounds for at least STEP_MIN_S, until STEP_ROUNDS of them met a fast
    spell (or for STEP_MAX_S): the median of those. A slow spell lasts seconds and catches every round of
    a shorter try: three int8 profiles read 0.29-0.30 us so where seven others read 0.15-0.17 (in slow
    spells the step reads 0.21 at the median, and swings from -0.3 to 0.7)."""
    import compiler

    from .measure import TIMERS, median_ms

    chains = [compiler.compile_source(f"model chain {{\n    input 1x1x1\n    {'relu ' * n}\n}}\n", "chain")
              for n in STEP_CHAINS]
    short, long = (TIMERS[table.target](c, table.threads, table.batch) for c in chains)
    rounds: list[tuple[float, float]] = []  # (step, the probe around it)
    start = time.monotonic()
    while True:
        (short_ms, long_ms), probe = state.around(lambda: (median_ms(short, samples), median_ms(long, samples)))
        rounds.append(((long_ms - short_ms) / (STEP_CHAINS[1] - STEP_CHAINS[0]), probe))
        fast = [step for step, probe in rounds if not state.slow(probe)]
        spent = time.monotonic() - start
        if spent >= STEP_MAX_S or (spent >= STEP_MIN_S and len(fast) >= STEP_ROUNDS):
            return max(0.0, statistics.median(fast or [step for step, _ in rounds]))


def check(specs: list[str], inputs: list[str], table: latency.Table, samples: int) -> list[dict]:
    rows = []
    models = _models(specs, inputs)
    rounds = Rounds(table, samples, Steadiness(table.target, table.threads, table.batch), profiles=0)
    rounds.settle(models, WHOLE_ROUNDS, MAX_WHOLE_ROUNDS)  # measured as the table's own whole models are
    for model in models:
        measured = rounds.best[_label(model)]
        predicted = latency.predict(model, table)
        rows.append({"model": _label(model), "predicted_ms": predicted.ms, "measured_ms": measured,
                     "error": predicted.ms / measured - 1, "estimated_units": predicted.estimated,
                     "units": len(predicted.units)})
    return rows


def _terms(f: dict) -> str:
    """The fitted terms as the prediction adds them (latency.predict)."""
    alone_scale, in_model_scale = latency.scales(f)
    alone = (f"{1e3 * f.get('alone_per_unit_ms', 0.0):+.2f} us{_above(f, 'alone')} + {alone_scale:.3f} x its "
             "time alone")
    if "per_moved_ms" in f:  # no in-model times nor step (PyTorch): every unit is timed alone
        above = f.get("alone_scale_above", 0)
        return (f"{f['per_moved_ms'] * 1e6:+.3f} ms per million elements moved + {alone_scale:.3f} x a unit's "
                "time alone" + (f" over {above:,} input elements, a smaller unit's as timed" if above else ""))
    if "in_model_per_unit_ms" not in f:  # an older table's
        return f"{1e3 * f['per_unit_ms']:+.2f} us per unit + {alone_scale:.3f} x its time alone"
    raw = f.get("raw_unit_inputs", 0)
    return (f"{1e3 * f['per_unit_ms']:.2f} us per unit (the step between kernels), then "
            + (f"a unit of up to {raw:,} input elements as timed, a larger one " if raw else "a unit ")
            + f"measured in a model {1e3 * f['in_model_per_unit_ms']:+.2f} us{_above(f, 'in_model')} + "
            f"{in_model_scale:.3f} x its time there, one measured alone {alone}" + _cold(f))


def _cold(f: dict) -> str:
    if not f.get("cold_ms_per_weight"):
        return ""
    return (f", {f['cold_ms_per_weight'] * 1e9:.0f} ps per weight in a model whose units move over "
            f"{f['cold_above']:,} elements")


def _above(f: dict, which: str) -> str:
    above = f.get(f"{which}_per_unit_above", 0)
    return f" (over {above:,} input elements)" if above and above != f.get("raw_unit_inputs") else ""


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for name in ("threads", "batch", "samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.space < 0:
        raise UsageError(f"--space must be 0 or more, got {args.space}")
    target = latency.canonical_target(args.target)
    path = latency.table_path(target, args.table)
    if args.check:
        table = latency.load_table(target, path)
        print(f"table: {table.describe()}")
        print("| model | predicted ms | measured ms | error | units estimated |\n|---|---:|---:|---:|---:|")
        for r in check(args.check, args.input, table, args.samples):
            print(f"| {r['model']} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | {100 * r['error']:+.1f}% | "
                  f"{r['estimated_units']} of {r['units']} |")
        return 0
    table = _open_table(path, target, args.threads, args.batch, args.fresh)
    models = _models(args.specs, args.input, args.space)
    measured, known = profile(models, table, args.samples)
    f = table.fit
    empties = f.get("overhead_points") or [[0, f["overhead_ms"]]]
    print(f"profile: {measured:,} units measured, {known:,} already in the table; overhead (the empty model) "
          f"{empties[0][1]:.4f} ms at {empties[0][0]:,} input elements to {empties[-1][1]:.4f} ms at "
          f"{empties[-1][0]:,}, then +{1e6 * f['overhead_ms_per_input']:.3f} ns per element; "
          f"{len(f['models'])} whole models fit {_terms(f)}")
    print(f"table: {table.describe()}")
    return 0
