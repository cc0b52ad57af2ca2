"""`nccompile SPEC`: compile a spec, print its summary and check its budgets.

Exit codes: 0 every budget holds, 1 a budget is exceeded, 2 invalid spec or usage.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from compiler.errors import NcError, UsageError

from . import ctrl_c
from .tracking import TRACKERS
from .usage import EXIT_BUDGET, EXIT_INTERNAL, EXIT_OK
from .usage import Parser as _Parser


def _arg_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nccompile", description="Compile a model spec, summarize it and check its budgets "
                                                "before any training.",
                epilog="other commands: `nccompile search SPEC` (a spec's search space against its budgets), "
                       "`nccompile study STUDY.yaml` (runs compared on Optuna storage), `nccompile load FILE` "
                       "(a model file rebuilt from itself); each takes --help")
    p.add_argument("spec", help="a .spec (DSL) or .yaml/.yml spec file")
    p.add_argument("--model", help="which model, when the file defines several")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a model parameter (repeatable), e.g. --param classes=10")
    p.add_argument("--input", metavar="CxHxW", help="override the input shape, e.g. --input 3x32x32")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--depth", type=int, metavar="N", help="show table rows down to this nesting depth")
    run = p.add_argument_group("running a recipe (imports torch)")
    run.add_argument("--recipe", metavar="NAME|PATH", help="a built-in recipe (scratch, kd, ...) or a recipe .yaml")
    run.add_argument("--data", metavar="PATH", help="image folder (ImageFolder train/ val/, or food-11); "
                                                    "default: the recipe's, else scikit-learn's digits")
    run.add_argument("--out", metavar="DIR", help="run directory (default runs/<spec>-<recipe>-<time>); "
                                                   "the same --out resumes")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                     help="override a recipe field by dotted path, e.g. --set steps.distill.epochs=3")
    run.add_argument("--epochs", type=int, metavar="N", help="epochs of every training step (quick runs)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--dry-run", action="store_true", help="print the steps and what each produces, then exit")
    run.add_argument("--track", action="append", default=[], choices=TRACKERS,
                     help="also log the run for TensorBoard (event files in OUT/tensorboard) or MLflow "
                          "(MLFLOW_TRACKING_URI, else ./mlflow.db); the `tracking` extra")
    return p


def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param expects NAME=VALUE, got `{item}`")
        out[name.strip()] = value.strip()
    return out


def run(argv: list[str]) -> int:
    from compiler import analyse, compile_spec, parse_shape
    from compiler.report import table, to_json

    args = _arg_parser().parse_args(argv)
    shape = parse_shape(args.input) if args.input is not None else None
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.depth is not None and args.depth < 0:  # 0: the totals without layer rows
        raise UsageError(f"--depth must be at least 0, got {args.depth}")
    if args.recipe:
        from .run.runner import Options
        from .run.runner import run as run_recipe

        return run_recipe(Options(args.spec, args.recipe, data=args.data, out=args.out, sets=tuple(args.sets),
                                  epochs=args.epochs, device=args.device, dry_run=args.dry_run,
                                  params=_params(args.param), input=shape, model=args.model,
                                  track=tuple(args.track)))
    if args.data or args.out or args.sets or args.epochs is not None or args.dry_run or args.track:
        raise UsageError("--data, --out, --set, --epochs, --dry-run and --track need --recipe")
    model = compile_spec(args.spec, model=args.model, param_strings=_params(args.param), input_shape=shape)
    analysis = analyse(model)
    print(to_json(analysis) if args.json else table(analysis, args.depth))
    return EXIT_OK if analysis.ok else EXIT_BUDGET


def load(argv: list[str]) -> int:
    """`nccompile load FILE`: rebuild the model from a model file alone and check it runs."""
    p = _Parser(prog="nccompile load", description="Rebuild the (dequantized) model from an nccompile model "
                                                     "file alone, print what it holds and run one forward pass.")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import json as _json

    import torch

    from compiler import analyse
    from compiler.limits import limit

    from .weights import ModelFile

    file = ModelFile(args.file)
    model = file.model()
    if math.prod(model.input_shape) > limit("input_elements"):
        raise NcError(f"{args.file}: its input {'x'.join(map(str, model.input_shape))} is over the limit of "
                      f"{limit('input_elements'):,} elements for a forward pass\n"
                      "  hint: raise it with NCCOMPILE_LIMIT_INPUT_ELEMENTS=N")
    module = file.build(model)
    with torch.no_grad():
        out = module(torch.zeros(1, *model.input_shape))
    info = {"file": args.file, "bytes": os.path.getsize(args.file), "format": file.format.name,
            "model": model.name, "params": analyse(model).params, "param_values": model.params,
            "input": list(model.input_shape), "output": list(out.shape[1:]), "quant": file.format.options()}
    if args.json:
        print(_json.dumps(info, indent=2))
    else:
        print(f"{args.file}: {info['bytes']:,} bytes, format {info['format']}, model {model.name} "
              f"({info['params']:,} params) from its embedded spec; input {'x'.join(map(str, info['input']))} "
              f"-> output {'x'.join(map(str, info['output']))}")
    return EXIT_OK


def search(argv: list[str]) -> int:
    """`nccompile search SPEC`: the configurations of a spec's search space that meet its budgets (no torch)."""
    from compiler.search import OBJECTIVES, pareto
    from compiler.search import search as run_search

    p = _Parser(prog="nccompile search", description="Analyse every configuration of the spec's search space "
                                                       "(parameters declared `in ...`) without torch; print the "
                                                       "ones that meet every budget, as a Pareto front.")
    p.add_argument("spec")
    p.add_argument("--model", help="which model, when the file defines several")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="fix a parameter")
    p.add_argument("--input", metavar="CxHxW")
    p.add_argument("--samples", type=int, metavar="N", help="draw N seeded configurations instead of all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", choices=OBJECTIVES, default="params",
                   help="capacity to maximise against file bytes (default: params); latency: parameters "
                        "against the latency predicted from this machine's table (nccompile profile)")
    p.add_argument("--latency-target", default=None, metavar="TARGET",
                   help="the table --objective latency ranks by (default: the spec's latency budget's, else "
                        "ort-fp32)")
    p.add_argument("--bytes", default="int8", metavar="FORMAT", help="the file format on the bytes axis "
                                                                      "(default: int8)")
    p.add_argument("--all", action="store_true", help="list every configuration that meets the budgets")
    p.add_argument("--json", action="store_true")
    p.add_argument("--emit", metavar="DIR", help="write each listed configuration as a concrete spec file")
    args = p.parse_args(argv)
    from compiler import parse_shape
    from compiler.fileformat import FORMAT_HELP, SPEC, is_format

    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    if args.bytes != SPEC and not is_format(args.bytes):
        raise UsageError(f"--bytes: unknown format `{args.bytes}`\n  expected: {SPEC} (the spec's precision) or "
                         f"{FORMAT_HELP}")
    shape = parse_shape(args.input) if args.input is not None else None
    target = args.latency_target or (_latency_target(args.spec, args.model) if args.objective == "latency" else None)
    result = run_search(args.spec, model=args.model, fixed=_params(args.param), input_shape=shape,
                        samples=args.samples, seed=args.seed, formats=(args.bytes,), latency_target=target)
    listed = result.candidates if args.all else pareto(result.candidates, args.objective, args.bytes)
    if args.emit:
        _emit_specs(listed, args.emit)
    if args.json:
        import json as _json

        print(_json.dumps({"model": result.model, "space_size": result.space_size, "evaluated": result.evaluated,
                           "feasible": len(result.candidates), "rejected_by_budget": result.rejected,
                           "invalid": result.invalid, "objective": args.objective, "bytes_format": args.bytes,
                           "listed": "all" if args.all else "pareto", "latency_target": target,
                           "candidates": [c.as_json() for c in listed]}, indent=2))
        return EXIT_OK
    names = list(listed[0].params) if listed else []
    print(f"{result.model}: {result.evaluated:,} of {result.space_size:,} configurations analysed in "
          f"{result.seconds:.2f} s ({result.evaluated / max(result.seconds, 1e-9):,.0f}/s): "
          f"{len(result.candidates):,} meet every budget, {result.rejected:,} break one, {result.invalid:,} invalid"
          + (f" (e.g. {result.invalid_example})" if result.invalid else ""))
    if not listed:
        return EXIT_BUDGET
    what = "every configuration that meets the budgets" if args.all else \
        f"Pareto front: most params for the least latency({target})" if args.objective == "latency" else \
        f"Pareto front: most {args.objective} for the fewest bytes({args.bytes})"
    print(what)
    header = [*names, "params_count", "macs", f"bytes({args.bytes})"] + ([f"latency({target}) ms"] if target else [])
    rows = [[str(c.params[n]) for n in names] + [f"{c.params_count:,}", f"{c.macs:,}", f"{c.bytes[args.bytes]:,}"]
            + ([f"{c.latency_ms:.3f}"] if target else []) for c in listed]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    if args.emit:
        print(f"specs: {args.emit}/ ({len(listed)} files)")
    return EXIT_OK


def _latency_target(spec: str, model: str | None) -> str:
    """The target of the spec's latency budget (the first), else ort-fp32."""
    from compiler.elaborate import select_model
    from compiler.parse import parse_file

    parsed, _, _ = parse_file(spec)
    definition = select_model(parsed, model)
    return next((b.format for b in definition.budgets if b.metric == "latency" and b.format), "ort-fp32")


def _emit_specs(candidates, folder: str) -> None:
    """Each candidate as a concrete spec file, written whole."""
    from pathlib import Path

    from compiler.emit import emit

    from .files import atomic_write

    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--emit {out} is a file, not a folder\n  hint: give a folder for the spec files")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for k, c in enumerate(candidates, 1):
            label = "-".join(f"{n}{v}" for n, v in c.params.items())
            text = emit(c.model, comment=f"nccompile search: {c.params}")
            atomic_write(out / f"{c.model.name}-{k:03d}-{label}.spec", text.encode())
    except OSError as err:
        raise UsageError(f"--emit {out}: cannot write the spec files there ({err.strerror})\n"
                         "  hint: give a folder you can write") from None


def _out_of_memory(err: BaseException) -> bool:
    """The machine's limit, not a bug: MemoryError, torch's OutOfMemoryError, a failed CPU allocation
    (told by name and message: the CLI does not import torch for it)."""
    text = str(err)
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "CUDA out of memory" in text)


def _interrupted() -> int:
    print("nccompile: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["load"]:
            return load(argv[1:])
        if argv[:1] == ["search"]:
            return search(argv[1:])
        if argv[:1] == ["profile"]:
            from .profile import main as profile_main

            return profile_main(argv[1:])
        if argv[:1] == ["study"]:
            from .study import main as study_main

            return study_main(argv[1:])
        return run(argv)
    except KeyboardInterrupt:
        return _interrupted()
    except NcError as err:
        if ctrl_c.fired():  # e.g. a RecursionError out of an interrupted import, read as a too-deep YAML
            return _interrupted()
        print(str(err) if err.located else f"nccompile: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # the reader went away (`nccompile spec | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise fail again flushing stdout at exit
        return 141
    except Exception as err:  # a bug in nccompile, not bad input
        if ctrl_c.fired():  # a Ctrl-C that a library's import turned into another exception
            return _interrupted()
        if os.environ.get("NCCOMPILE_DEBUG"):
            raise
        if _out_of_memory(err):
            print(f"nccompile: error: out of memory ({str(err).strip().splitlines()[0][:200]})\n  hint: a smaller "
                  "--input, data.batch_size or data.eval_batch_size; finished steps and epochs are kept",
                  file=sys.stderr)
            return 2
        print(f"nccompile: internal error: {type(err).__name__}: {err}\n"
              "  hint: this is a bug in nccompile; rerun with NCCOMPILE_DEBUG=1 for the traceback and report it",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
