"""Runs a recipe: validate everything, plan the steps, execute them, report.

Everything that can be checked is checked before any work starts: the recipe, the
data layout, the class counts, checkpoints, which step produces what, and the
spec's budgets at the training input size. Under torchrun every rank runs the same
plan; only rank 0 writes files.
"""
from __future__ import annotations

import os
import time
from dataclasses import KW_ONLY, dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml

import compiler
from compiler.analysis import analyse
from compiler.errors import BudgetError, NcError, did_you_mean
from compiler.fileformat import weight_tensors
from compiler.report import table

from .. import tracking
from ..data import check_decodable, list_source
from ..recipe import RecipeError
from ..rundir import RUN_FILES, RUN_RECORDS, RunDir, check_own_folder, digest, write_json, write_text
from ..train import distributed
from ..train.context import ModelSlot, RunContext, pipeline_for
from ..train.speed import resolve as resolve_speed
from ..weights import ModelFile
from . import stepcache
from .plan import Plan, make_plan
from .plan import load as load_plan
from .stepkeys import shared_settings, step_key


@dataclass
class Options:
    """What to run: a spec and a recipe; everything else by name."""

    spec: str
    recipe: str
    _: KW_ONLY
    data: str | None = None
    out: str | None = None
    sets: tuple = ()
    epochs: int | None = None
    device: str = "auto"
    dry_run: bool = False
    params: dict | None = None
    input: tuple | None = None
    model: str | None = None
    on_epoch: object = None        # callable(step label, epoch row) after each training epoch (studies)
    step_cache: Path | None = None  # finished steps shared with other runs by key (a study's; runtime.run.stepcache)
    track: tuple = ()              # trackers that also see the run (runtime.tracking): ("tensorboard", "mlflow")
    track_parent: str | None = None  # the MLflow run this one nests under (a study's trial)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NcError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


def _compile(path, classes: list[str], input_shape, what: str, *, model: str | None = None,
             params: dict | None = None, strings: dict | None = None):
    """Compile a spec once for the data: a declared `classes` parameter is the data's class count."""
    given = {**(params or {}), **(strings or {})}
    if "classes" in given and str(given["classes"]) != str(len(classes)):
        raise NcError(f"{what}: classes={given['classes']} but the data has {len(classes)} classes")
    m = compiler.compile_spec(path, model=model, params=params, param_strings=strings, input_shape=input_shape,
                              if_declared={"classes": len(classes)})
    if m.root.out_shape != (len(classes),):
        raise NcError(f"{what} ({path}) outputs {'x'.join(map(str, m.root.out_shape))} values but the data has "
                      f"{len(classes)} classes\n  hint: declare a `classes: int` parameter and end with "
                      f"`linear(classes)` so the class count comes from the data")
    return m


def _check_checkpoint(slot: ModelSlot, path: Path, n_classes: int) -> None:
    state = ModelFile(path).state(slot.model)
    expected = dict((n, tuple(s)) for n, s in weight_tensors(slot.model))
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != shape:
            if shape and shape[0] == n_classes and state[name].dim() == len(shape):
                raise NcError(f"{slot.name} checkpoint {path} has {state[name].shape[0]} classes ({name}) but the "
                              f"data has {n_classes}\n  hint: use a checkpoint trained on this data, or drop the "
                              f"checkpoint so the recipe trains the {slot.name} first")
            raise NcError(f"{slot.name} checkpoint {path} does not fit {slot.model.spec.path}: {name} has shape "
                          f"{tuple(state[name].shape)}, the spec needs {shape}")
    missing = [n for n in expected if n not in state]
    if missing:
        raise NcError(f"{slot.name} checkpoint {path} lacks {len(missing)} tensor(s) of {slot.model.spec.path}, "
                      f"e.g. {missing[0]}")


def _check_torchvision_weights(model, name: str, weights: str) -> None:
    """Named pretrained weights must exist for the model (checked before anything downloads)."""
    import torchvision

    if model.root.op != "torchvision":
        raise NcError(f"models.{name}.torchvision_weights needs a spec that is a torchvision model")
    arch = model.root.attrs["name"]
    known = list(torchvision.models.get_model_weights(arch).__members__)
    if weights not in known:
        raise NcError(f"models.{name}.torchvision_weights: torchvision has no weights `{weights}` for {arch}"
                      + (f"; {did_you_mean(weights, known)}" if did_you_mean(weights, known) else "")
                      + f" (known: {', '.join(known)})")


def _resolve(path: str, recipe_path: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    candidate = recipe_path.parent / p
    return candidate.resolve() if candidate.exists() else p


def recipe_and_data(opts: Options):
    """The recipe with its overrides and its steps, and the listing of the data it trains on."""
    recipe, steps, recipe_path = load_plan(opts.recipe, opts.sets, opts.epochs)
    if opts.data:
        recipe.data.path = opts.data
        if recipe.data.source == "auto":
            recipe.data.source = "folder"
    return recipe, steps, recipe_path, list_source(recipe.data)


def student_for(opts: Options, recipe, classes: list[str]):
    """The spec as the run builds it: a declared `classes` is the data's count, and the input is
    --input, else the recipe's size with the spec's channels, else the spec's own."""
    shape = opts.input or (compiler.parse_shape(recipe.input) if recipe.input else None)
    student = _compile(opts.spec, classes, shape, "the spec", model=opts.model, strings=opts.params)
    declared = student.definition.input
    if opts.input is None and recipe.input and declared and declared[0] != shape[0]:
        # a recipe sets the training size for any spec; the channels are the model's, as its spec says
        shape = (declared[0], *shape[1:])
        student = _compile(opts.spec, classes, shape, "the spec", model=opts.model, strings=opts.params)
    return student


def prepare(opts: Options):
    """All validation; returns (context pieces, plan) without doing any work."""
    recipe, steps, recipe_path, listing = recipe_and_data(opts)
    classes = listing.classes
    student = student_for(opts, recipe, classes)
    check_decodable(listing, recipe.data, student.input_shape)
    input_shape = student.input_shape
    analysis = analyse(student)
    if not analysis.ok:
        raise BudgetError(table(analysis, max_depth=1) + "\nnccompile: error: the spec exceeds its budget(s) at the "
                          f"training input {'x'.join(map(str, input_shape))}; nothing was run",
                          [f"{b.name} fails: {b.shown()}" for b in analysis.budgets if not b.ok])
    slots = {"student": ModelSlot("student", student)}
    for name, ref in recipe.models.items():
        spec_path = _resolve(ref.spec, recipe_path)
        m = _compile(spec_path, classes, input_shape, f"models.{name}", params=ref.params)
        if ref.torchvision_weights:
            _check_torchvision_weights(m, name, ref.torchvision_weights)
        slot = ModelSlot(name, m, torchvision_weights=ref.torchvision_weights)
        if ref.torchvision_state:
            from ..torchvision_state import pairing

            slot.torchvision_state = _resolve(ref.torchvision_state, recipe_path)
            if not slot.torchvision_state.is_file():
                raise NcError(f"models.{name}.torchvision_state: no such file {slot.torchvision_state}")
            pairing(m, m.name, m.root.out_shape[0])  # a spec that does not pair fails here, before any work
            slot.producer_key = digest("torchvision_state", str(slot.torchvision_state),
                                       slot.torchvision_state.stat().st_mtime_ns)
        if ref.checkpoint:
            ckpt = _resolve(ref.checkpoint, recipe_path)
            _check_checkpoint(slot, ckpt, len(classes))
            slot.weights, slot.producer = ckpt, "checkpoint"
            slot.producer_key = digest("checkpoint", str(ckpt), ckpt.stat().st_size, ckpt.stat().st_mtime_ns)
        slots[name] = slot
    # the plan's problems and the transforms' (built for the training input, sizes included), all at once
    pipelines, problems = {}, []
    try:
        plan = make_plan(recipe, recipe_path, steps, slots, listing)
    except RecipeError as err:
        problems += err.problems
    for which in ("train", "eval"):
        try:
            pipelines[which] = pipeline_for(recipe, which, input_shape, listing)
        except RecipeError as err:
            problems += err.problems
    if problems:
        raise RecipeError(str(recipe_path), problems)
    if plan.budget_failures:
        raise BudgetError("\nnccompile: error: ".join(f"{f}; nothing was run" for f in plan.budget_failures),
                          plan.budget_failures)
    return recipe, recipe_path, listing, slots, plan, pipelines


def _budgets(model) -> list[str]:
    """The spec's budgets with their values at the training input, as checked before any work."""
    a = analyse(model)
    if not a.budgets:
        return [f"budgets: none in {model.spec.path}"]
    return [f"budgets at the training input {'x'.join(map(str, model.input_shape))}:"] + [
        f"  {'ok  ' if b.ok else 'FAIL'}  {b.name}: {b.shown()}"
        + (f" ({100 * b.value / b.limit:.1f}% of the limit)" if b.limit else "") for b in a.budgets]


def _declared_note(model, input_shape) -> str:
    declared = model.definition.input
    if not declared or tuple(declared) == tuple(input_shape):
        return ""
    return f" (the spec declares {'x'.join(map(str, declared))}; the recipe's `input` or --input sets this one)"


def _timeline(recipe, listing, slots, plan, input_shape, pipelines, speed) -> str:
    lines = [f"recipe {recipe.name}: {recipe.description}".rstrip(": "),
             f"data: {listing.description} ({len(listing.classes)} classes), training input "
             f"{'x'.join(map(str, input_shape))}" + _declared_note(slots["student"].model, input_shape),
             *_budgets(slots["student"].model),
             f"transforms.train: {pipelines['train'].describe()}",
             f"transforms.eval: {pipelines['eval'].describe()}",
             f"speed: {speed.describe()}"]
    for name, slot in slots.items():
        origin = {None: "fresh initialisation", "checkpoint": f"checkpoint {slot.weights}"}.get(slot.producer)
        if slot.torchvision_weights:
            origin = f"torchvision weights {slot.torchvision_weights}"
        lines.append(f"model {name}: {slot.model.spec.path}, {analyse(slot.model).params:,} params, "
                     f"starts from {origin}")
    formats: dict[str, object] = {}  # the format of each model's file as the plan goes, where known
    reshaped: set[str] = set()       # models whose spec a step rewrites: the plan no longer knows them
    for i, step in enumerate(plan.steps, 1):
        cfg, kind, skip = step.config, step.kind, step.skip
        produces = ", ".join(f"{p} weights (steps/{cfg.name}/model.safetensors)" for p in kind.produces(cfg))
        notes = [] if skip or cfg.model in reshaped else kind.plan_notes(
            cfg, slots[cfg.model].model, formats.get(cfg.model), listing.classes, pipelines["eval"].norm)
        lines.append(f"{i}. {cfg.name} [{cfg.kind}]: {kind.describe(cfg)}"
                     + (f" -- skipped: {skip}" if skip else "")
                     + (f"\n     needs: {', '.join(kind.needs(cfg))}" if kind.needs(cfg) else "")
                     + (f"\n     produces: {produces}" if produces and not skip else "")
                     + "".join(f"\n     {note}" for note in notes))
        if not skip and cfg.model in kind.produces(cfg) and cfg.model not in reshaped:
            formats[cfg.model] = kind.written_format(cfg, slots[cfg.model].model)
        if not skip and kind.reshapes(cfg):
            reshaped.add(cfg.model)
    return "\n".join(lines)


def _markdown(entries: list[dict]) -> str:
    head = ("| step | kind | model | params | file bytes | val accuracy | seconds | status |\n"
            "|---|---|---|---:|---:|---:|---:|---|")
    rows = []
    for e in entries:
        acc = f"{e['val_accuracy']:.4f}" if isinstance(e.get("val_accuracy"), float) else "-"
        size = f"{e['file_bytes']:,}" if e.get("file_bytes") else "-"
        rows.append(f"| {e['name']} | {e['kind']} | {e['model']} | {e['params']:,} | {size} | {acc} | "
                    f"{e['seconds']:.1f} | {e['status']} |")
    return "\n".join([head, *rows])


def run(opts: Options) -> int:
    rank, world = distributed.launched()
    device = distributed.start(_device(opts.device))
    try:
        return _run(opts, rank, world, device)
    finally:
        distributed.stop()


def _run(opts: Options, rank: int, world: int, device) -> int:
    recipe, recipe_path, listing, slots, plan, pipelines = prepare(opts)
    student = slots["student"].model
    speed = resolve_speed(recipe.speed, device, ddp=distributed.active())
    timeline = _timeline(recipe, listing, slots, plan, student.input_shape, pipelines, speed)
    if opts.dry_run:
        if rank == 0:
            print(timeline)
        return 0
    out = Path(opts.out) if opts.out else Path("runs") / (
        f"{Path(opts.spec).stem}-{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    tracking.require(opts.track)  # a missing extra is said before anything is written
    run_dir = RunDir(out, writer=rank == 0)
    if rank == 0:
        _make_run_dir(out)
        run_dir.lock()
        run_dir.begin()
    tracked: list = []
    error: BaseException | None = None
    try:
        if rank == 0:
            write_text(out / f"spec{Path(opts.spec).suffix}", student.source)
            recipe_text = yaml.safe_dump(
                {**recipe.model_dump(exclude={"steps"}), "steps": [s.config.model_dump() for s in plan.steps]},
                sort_keys=False)
            write_text(out / "recipe.yaml", recipe_text)
            print(timeline)
            print(f"run directory: {out}")
            tracked = tracking.trackers(opts.track, out, opts.track_parent)
            for t in tracked:
                t.start(recipe_text, student.source, _budgets(student),
                        {**student.params, "input": "x".join(map(str, student.input_shape))})
        ctx = RunContext(recipe, run_dir, listing, student.input_shape, device, slots, rank, world,
                         pipelines=pipelines, speed=speed, on_epoch=_epoch_listeners(opts.on_epoch, tracked))
        with speed.backends():
            return _execute(opts, ctx, plan, out, tracked)
    except BaseException as err:
        error = err
        raise
    finally:
        for t in tracked:
            t.close(error)
        if rank == 0:
            run_dir.unlock()


def _epoch_listeners(on_epoch, tracked: list):
    """The study's callback (which may stop the run) after the trackers have the epoch."""
    if not tracked:
        return on_epoch

    def listen(label, row):
        for t in tracked:
            t.epoch(label, row)
        if on_epoch is not None:
            on_epoch(label, row)

    return listen


def _make_run_dir(out: Path) -> None:
    check_own_folder(out, RUN_FILES, RUN_RECORDS, "nccompile run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NcError(f"cannot create the run directory {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise NcError(f"cannot write to the run directory {out}\n  hint: choose a folder you can write")


def _execute(opts: Options, ctx: RunContext, plan: Plan, out: Path, tracked: list = ()) -> int:
    """Run the planned steps in order (skipping those finished earlier), writing the report after each."""
    recipe, listing, run_dir, rank = ctx.recipe, ctx.listing, ctx.run, ctx.rank
    shared = shared_settings(recipe)
    sharing = opts.step_cache is not None and ctx.world == 1 and rank == 0
    entries = []
    accuracy: dict[str, float] = {}
    for step in plan.steps:
        cfg, kind, skip = step.config, step.kind, step.skip
        slot = ctx.models[cfg.model]
        start = time.perf_counter()
        key = step_key(shared, step, ctx.models, listing.fingerprint, ctx.input_shape)
        entry = {"name": cfg.name, "kind": cfg.kind, "model": cfg.model, "key": key}
        if skip:
            entry.update(status=f"skipped ({skip})", result={})
        elif (done := run_dir.finished(cfg.name, key)) is not None:
            entry.update(status="done earlier", result=done["result"])
            ctx.log(f"== {cfg.name}: already done in {out} (same inputs), skipped")
        elif sharing and (reused := stepcache.obtain(opts.step_cache, key, run_dir.step_dir(cfg.name),
                                                     ctx.log)) is not None:
            reused["seconds"] = time.perf_counter() - start  # what this run spent on it
            run_dir.mark_finished(cfg.name, key, reused)
            entry.update(status="reused", result=reused)
            ctx.log(f"== {cfg.name}: reused from {opts.step_cache} (another run of the study, same inputs)")
        else:
            try:
                ctx.log(f"== {cfg.name} [{cfg.kind}]: {kind.describe(cfg)}")
                result = kind.run(cfg, ctx, key)
                stored = {"model_file": str(result.model_file.relative_to(out)) if result.model_file else None,
                          "spec_file": str(result.spec_file.relative_to(out)) if result.spec_file else None,
                          "metrics": {k: v for k, v in result.metrics.items() if k != "history"},
                          "files": result.files, "seconds": time.perf_counter() - start}
                run_dir.mark_finished(cfg.name, key, stored)
                entry.update(status="ran", result=stored)
                if sharing:
                    stepcache.publish(opts.step_cache, key, run_dir.step_dir(cfg.name), stored)
            finally:
                if sharing:
                    stepcache.release(opts.step_cache, key)
        result = entry.pop("result")
        if result.get("spec_file"):  # the step changed the architecture: the model is now that spec
            slot.model = compiler.compile_spec(out / result["spec_file"], params=slot.model.params,
                                               input_shape=slot.model.input_shape)
        if result.get("model_file"):
            slot.weights, slot.producer, slot.producer_key = out / result["model_file"], cfg.name, key
        # Each entry describes the model after the step: its current file and latest measured accuracy.
        measured = result.get("metrics", {}).get("val_accuracy")
        if measured is not None:
            accuracy[cfg.model] = measured
        file_bytes = slot.weights.stat().st_size if slot.weights is not None and slot.weights.exists() else None
        summary = analyse(slot.model)
        if summary.latency:  # the spec has latency budgets: the model's predicted latency on their targets
            entry["latency_ms"] = {target: p["ms"] for target, p in summary.latency.items()}
        entry.update(params=summary.params, macs=summary.macs, file_bytes=file_bytes,
                     val_accuracy=accuracy.get(cfg.model),
                     seconds=result.get("seconds", 0.0), model_file=result.get("model_file"),
                     files=result.get("files", []), metrics=result.get("metrics", {}))
        entries.append(entry)
        if rank == 0:
            write_json(out / "report.json", {"spec": opts.spec, "recipe": str(plan.path), "run": str(out),
                                             "steps": entries})
            for t in tracked:
                t.step(len(entries) - 1, entry)
    if rank == 0:
        md = _markdown(entries)
        write_text(out / "report.md", md + "\n")
        print(md)
        print(f"report: {out / 'report.json'}")
    return 0
