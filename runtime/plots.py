"""PNG plots (matplotlib, headless), written atomically."""
from __future__ import annotations

import io
from pathlib import Path

from .files import atomic_write


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def training_curves(history: list[dict], path: Path, title: str) -> None:
    if not history:
        return
    plt = _figure()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    plt.close(fig)


NAMED_CLASSES = 60  # up to this many classes every row and column is named; past it, every k-th by index
MAX_INCHES = 20      # the figure grows with the classes up to this (2,000 pixels), not without end


def confusion_matrix(matrix, classes: list[str], path: Path, title: str) -> None:
    plt = _figure()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(MAX_INCHES, max(5, 0.6 * n + 2)), min(MAX_INCHES, max(4, 0.6 * n + 1))))
    matrix = matrix.numpy() if hasattr(matrix, "numpy") else matrix
    im = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    if n <= NAMED_CLASSES:
        ticks, labels = range(n), classes
    else:
        ticks = range(0, n, -(-n // 20))
        labels = [str(i) for i in ticks]
    ax.set(xticks=ticks, yticks=ticks, xticklabels=labels, yticklabels=labels,
           xlabel="predicted" if n <= NAMED_CLASSES else "predicted (class index)",
           ylabel="true" if n <= NAMED_CLASSES else "true (class index)", title=title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    if n <= 20:
        top = matrix.max() if matrix.size else 0
        for i in range(n):
            for j in range(n):
                v = int(matrix[i, j])
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if top and v > top / 2 else "black")
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    plt.close(fig)


def pruning_curve(points: list[dict], path: Path, title: str) -> None:
    """Parameters (x) against validation accuracy (y), one line per run (e.g. per rate)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs: dict[str, list[dict]] = {}
    for p in points:
        runs.setdefault(p["run"], []).append(p)
    for run, pts in runs.items():
        ax.plot([p["params"] for p in pts], [p["val_accuracy"] for p in pts], "o-", label=run)
    ax.set(xlabel="parameters", ylabel="validation accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def study_pareto(table: list[dict], path: Path, budgets: list[int], title: str, x: str = "file_bytes") -> None:
    """A study's finished trials: accuracy against file bytes (or `x`: latency_ms, predicted), the Pareto
    front and the byte budgets."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in table if r["status"] in ("done", "repeat") and r[x] and r["val_accuracy"] is not None]
    for r in done:
        ax.scatter(r[x], r["val_accuracy"], color="tab:blue")
        ax.annotate(r["name"], (r[x], r["val_accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front, best = [], -1.0
    for r in sorted(done, key=lambda r: (r[x], -r["val_accuracy"])):
        if r["val_accuracy"] > best:
            front.append(r)
            best = r["val_accuracy"]
    if len(front) > 1:
        ax.step([r[x] for r in front], [r["val_accuracy"] for r in front], where="post",
                color="tab:orange", label="Pareto front")
    for limit in sorted(set(budgets)):
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"budget {limit:,} bytes")
    latency = x == "latency_ms"
    ax.set_xlabel("predicted latency (ms)" if latency else "model file bytes")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{title}: accuracy against {'latency' if latency else 'file size'} ({len(done)} finished trials)")
    if len(front) > 1 or budgets:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def study_pruning(table: list[dict], path: Path, title: str) -> None:
    """The report's Q3 figure: accuracy and parameters at every pruning iteration, one line per rate."""
    plt = _figure()
    fig, (acc_ax, par_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in table:
        points = r["_points"] or []
        by_run: dict = {}
        for p in points:  # iteration 0 (before pruning) has no rate: it starts every line of its run
            by_run.setdefault((r["name"], p.get("run")), []).append(p)
        for (name, _), ps in by_run.items():
            its = [p["iteration"] for p in ps]
            rate = next((p["rate"] for p in ps if p.get("rate") is not None), None)
            label = name if rate is None else f"{name}, keep rate {rate}"
            acc_ax.plot(its, [p["val_accuracy"] for p in ps], marker="o", label=label)
            par_ax.plot(its, [p["params"] for p in ps], marker="o", label=label)
    acc_ax.set_xlabel("pruning iteration")
    acc_ax.set_ylabel("validation accuracy")
    par_ax.set_xlabel("pruning iteration")
    par_ax.set_ylabel("parameters")
    acc_ax.legend(fontsize=7)
    fig.suptitle(f"{title}: pruning")
    _save(fig, path)
    plt.close(fig)
