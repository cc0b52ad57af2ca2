"""`nccompile study STUDY.yaml`: compare runs (explicit, a grid, or an Optuna search over a spec's
space) on shared Optuna storage, and write results.csv, summary.md and pareto.png."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from compiler.errors import UsageError

from ..tracking import TRACKERS, require


def _parser():
    from ..usage import Parser

    p = Parser(prog="nccompile study", description="Run a study: every trial an ordinary nccompile run in "
                                                     "OUT/trials/NAME, results in OUT/results.csv, summary.md, "
                                                     "pareto.png. Running it again skips finished trials and "
                                                     "resumes interrupted ones.")
    p.add_argument("study", help="a study .yaml (see specs/studies/)")
    p.add_argument("--data", metavar="PATH", help="image folder for every trial (default: the study's, else digits)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs of every training step of every trial")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a recipe override for every trial")
    p.add_argument("--out", metavar="DIR", help="the study directory (default: runs/study-NAME)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes (default 1)")
    p.add_argument("--trials", type=int, metavar="N", help="search trials to train (default: the study's)")
    p.add_argument("--storage", metavar="URL", help="shared database (postgresql://..., mysql+pymysql://...); "
                                                     "default: a journal file in the study directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--track", action="append", default=[], choices=TRACKERS,
                   help="also log every trial for TensorBoard (OUT/trials/NAME/tensorboard) or MLflow (a study "
                        "run with a nested run per trial); the `tracking` extra")
    p.add_argument("--dry-run", action="store_true", help="check every trial and show what would run: each run "
                                                           "with its budgets, a search's space; trains and "
                                                           "writes nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set for spawned workers
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.trials is not None and args.trials < 0:
        raise UsageError(f"--trials must be 0 or more, got {args.trials}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    from ..rundir import check_own_folder
    from .config import load_study
    from .engine import Study
    from .outputs import STUDY_FILES, STUDY_RECORDS, progress, write_all

    cfg, path = load_study(args.study)
    if args.trials is not None and cfg.search is None:
        raise UsageError(f"--trials counts a search's trials, and {path} has no `search` (its runs and grid "
                         "points all run)")
    out = Path(args.out) if args.out else Path("runs") / f"study-{cfg.name}"
    check_own_folder(out, STUDY_FILES, STUDY_RECORDS, "nccompile study")
    study = Study(cfg, path, out, data=args.data, epochs=args.epochs, sets=tuple(args.sets), device=args.device,
                  storage=args.storage, trials=args.trials, track=tuple(args.track))  # every trial validated
    require(study.track)  # a missing extra is said before anything runs
    if args.dry_run:
        from .preview import preview

        print("\n".join(preview(study)))
        return 0
    title = f"study {cfg.name}" + (f": {cfg.description}" if cfg.description else "")
    handle = study.open()  # creates the study and enqueues the fixed trials, once, before any worker starts
    if "mlflow" in study.track:  # one study run, made before any worker starts, kept in the storage
        from ..tracking.mlflow_runs import study_run

        study.track_parent = study_run(cfg.name, out, handle.user_attrs.get("mlflow_run"))
        handle.set_user_attr("mlflow_run", study.track_parent)

    def report(s):
        print(f"study {cfg.name}: {progress(s, study.trials_wanted - study.searched(s))}", flush=True)
        write_all(s, out, sorted(study.byte_limits), title)

    if args.workers > 1 and not args.worker:
        _spawn(argv, args.workers)
    else:
        if args.worker and os.environ.get("NCCOMPILE_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["NCCOMPILE_THREADS"]))
        study.work(on_progress=report)
    if not args.worker:
        files = write_all(handle, out, sorted(study.byte_limits), title)  # the last one finished writes them
        print(f"study {cfg.name}: {progress(handle)}")
        print((out / "summary.md").read_text().rstrip())
        print("outputs: " + ", ".join(str(f) for f in files))
        if study.track_parent:
            from ..tracking.mlflow_runs import study_done

            study_done(study.track_parent, handle, files)
    return 0


def _spawn(argv: list[str], workers: int) -> None:
    """N worker processes of this same command; each takes trials from the shared storage."""
    rest = [a for a in argv if not a.startswith("--workers")]
    if "--workers" in argv:
        i = argv.index("--workers")
        rest = argv[:i] + argv[i + 2:]
    env = dict(os.environ, NCCOMPILE_THREADS=str(max(1, (os.cpu_count() or 1) // workers)))
    cmd = [sys.executable, "-m", "runtime", "study", *rest, "--worker"]
    # each worker seeds its sampler apart, or identically seeded workers draw the same configurations
    procs = [subprocess.Popen(cmd, env=dict(env, NCCOMPILE_WORKER_INDEX=str(k))) for k in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.wait()  # each worker got the Ctrl-C too: it records its trial and stops
        raise
    if any(codes):
        print(f"nccompile study: {sum(1 for c in codes if c)} worker(s) ended with an error", file=sys.stderr)
