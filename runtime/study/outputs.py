"""A study's outputs, from its storage alone (so any worker on any machine can write them):
`results.csv`, `summary.md`, `pareto.png` and, for pruning studies, `pruning.png` (the report's
Q3 figure). Each is written whole (temporary file, then rename)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import optuna

from ..files import atomic_write
from ..plots import study_pareto, study_pruning
from .trials import resumed_numbers

COLUMNS = ["trial", "name", "status", "spec", "recipe", "model_params", "overrides", "params_count", "macs",
           "file_bytes", "latency_ms", "measured_latency_ms", "val_accuracy", "objective", "seconds", "error"]
# what a study folder holds: these outputs, the journal storage and its lock, the trials' run folders;
# any of the records shows that a study wrote it (with a database for storage there is no journal)
STUDY_FILES = frozenset({"results.csv", "summary.md", "pareto.png", "pareto_latency.png", "pruning.png",
                         "study.journal",
                         "study.journal.lock", "trials", "shared"})
STUDY_RECORDS = frozenset({"study.journal", "results.csv", "trials"})
_STATE = {optuna.trial.TrialState.WAITING: "waiting", optuna.trial.TrialState.RUNNING: "running"}


def rows(study: optuna.Study) -> list[dict]:
    """One row per trial that stands for a run (not the bookkeeping of retries and races)."""
    out = []
    trials = study.get_trials(deepcopy=False)
    resumed = resumed_numbers(trials)
    for t in trials:
        a = t.user_attrs
        status = _STATE.get(t.state) or a.get("status", t.state.name.lower())
        if status in ("unused", "duplicate") or t.number in resumed:
            continue
        out.append({"trial": t.number, "name": a.get("name") or a.get("run") or f"trial-{t.number}",
                    "status": status, "spec": a.get("spec", ""), "recipe": a.get("recipe", ""),
                    "model_params": json.dumps(a.get("model_params", t.params if "run" not in t.params else {})),
                    "overrides": json.dumps(a.get("overrides", {})), "params_count": a.get("params_count"),
                    "macs": a.get("macs"), "file_bytes": a.get("file_bytes"), "val_accuracy": a.get("val_accuracy"),
                    "latency_ms": a.get("latency_ms"), "measured_latency_ms": a.get("measured_latency_ms"),
                    "objective": t.value if t.value is not None else a.get("objective"),
                    "seconds": round(a["seconds"], 1) if isinstance(a.get("seconds"), float) else a.get("seconds"),
                    "error": a.get("error", ""), "_points": a.get("prune_points")})
    return out


def progress(study: optuna.Study, search_left: int = 0) -> str:
    """`trials: 3 done, 1 running, 2 waiting, ...`; waiting trials and search trials not yet drawn are left."""
    table = rows(study)
    count = {s: sum(1 for r in table if r["status"] == s) for s in ("done", "running", "waiting", "failed",
                                                                     "pruned", "rejected", "repeat")}
    text = "trials: " + ", ".join(f"{n} {s}" for s, n in count.items() if n)
    return text + (f", {search_left} search trial(s) left to draw" if search_left > 0 else "")


def write_all(study: optuna.Study, out: Path, budgets: list[int], title: str) -> list[Path]:
    table = rows(study)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in table:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    atomic_write(out / "results.csv", buf.getvalue().encode())
    atomic_write(out / "summary.md", summary(table, title).encode())
    written = [out / "results.csv", out / "summary.md", out / "pareto.png"]
    short = title.split(":")[0]  # the study's name: its description goes in summary.md
    study_pareto(table, out / "pareto.png", budgets, short)
    if any(r["latency_ms"] is not None for r in table):  # a latency budget: accuracy against predicted latency
        study_pareto(table, out / "pareto_latency.png", [], short, x="latency_ms")
        written.append(out / "pareto_latency.png")
    if any(r["_points"] for r in table):
        study_pruning(table, out / "pruning.png", short)
        written.append(out / "pruning.png")
    return written


def summary(table: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "| trial | name | status | params | MACs | file bytes | val accuracy | seconds |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]

    def num(v, fmt="{:,}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    ranked = sorted(table, key=lambda r: (r["status"] != "done", -(r["val_accuracy"] or 0)))
    shown = set()
    for r in ranked:
        if r["status"] == "rejected" and r["name"] in shown:  # drawn again: results.csv lists every draw
            continue
        shown.add(r["name"])
        lines.append(f"| {r['trial']} | {r['name']} | {r['status']} | {num(r['params_count'])} | {num(r['macs'])} "
                     f"| {num(r['file_bytes'])} | {num(r['val_accuracy'], '{:.4f}')} | {num(r['seconds'])} |")
    # why a run has no result: each configuration once, however often the sampler drew it
    notes = list(dict.fromkeys(f"- {r['name']} ({r['status']}): {r['error']}" for r in table if r["error"]))
    if notes:
        lines += ["", "Stopped, failed or rejected:", ""] + notes
    return "\n".join(lines) + "\n"
