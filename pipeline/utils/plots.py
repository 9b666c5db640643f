"""Run reports drawn with matplotlib (imported lazily): confusion matrices, learning curves, misclassified rows,
the 2-D map of cached features. Every plot writes to a path or to a binary file object (the HTML report
keeps its pictures in memory)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def preload() -> None:
    """Import matplotlib (about 1.5 s) in the background while a long job runs: its plots are quicker at the end."""
    import threading

    threading.Thread(target=_plt, name="preload-matplotlib", daemon=True).start()


def _save(fig, path: Path | BinaryIO) -> None:
    # no "Software: ... https://matplotlib.org" chunk: a report must not name any web address
    fig.savefig(path, dpi=100, format="png", metadata={"Software": None})
    _plt().close(fig)


def plot_confusion(
    path: Path | BinaryIO, cm: Sequence[Sequence[int]], class_names: Sequence[str], title: str
) -> None:
    plt = _plt()
    cm = np.asarray(cm)
    n = len(class_names)
    size = min(14.0, 2.5 + 0.55 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        hi = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if cm[i, j] > hi / 2 else "black",
                    )
    fig.tight_layout()
    _save(fig, path)


def plot_split_confusions(
    run_dir: Path, metrics: dict[str, Any], class_names: Sequence[str], title: str = ""
) -> None:
    """``confusion_val.png`` and ``confusion_test.png`` of a run, titled with the split's accuracy."""
    for split in ("val", "test"):
        cm = metrics[split].get("confusion_matrix")
        if cm:
            label = f"{title}{metrics['head']} · {split} · acc {metrics[split]['accuracy']:.3f}"
            plot_confusion(run_dir / f"confusion_{split}.png", cm, class_names, label)


def plot_learning_curves(
    path: Path | BinaryIO, history: dict[str, list[float]], title: str, epoch0: dict[str, float] | None = None
) -> None:
    """Train (and val) loss and accuracy per epoch; ``epoch0`` (the model before any epoch) starts them at 0."""
    plt = _plt()
    metrics = [m for m in ("loss", "accuracy") if m in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    start = epoch0 or {}
    for ax, m in zip(axes[0], metrics, strict=True):
        for key, label in ((m, "train"), (f"val_{m}", "val")):
            if key not in history:
                continue
            first = [start[key]] if key in start else []
            ax.plot(range(1 - len(first), len(history[key]) + 1), first + list(history[key]), label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(m)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_feature_map(
    path: Path | BinaryIO,
    maps: dict[str, tuple[np.ndarray, np.ndarray, tuple[str, str]]],
    class_names: Sequence[str],
    title: str,
) -> None:
    """Side-by-side 2-D scatter plots, ``name → (points N×2, class indices, (x label, y label))``, coloured by
    class with one legend of class names."""
    plt = _plt()
    n = len(class_names)
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    colour = (lambda i: cmap(i)) if n <= 20 else (lambda i: cmap(i / max(1, n - 1)))
    fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps) + 1.8, 5.0), squeeze=False)
    for ax, (name, (xy, lab, (xlabel, ylabel))) in zip(axes[0], maps.items(), strict=True):
        for i, cls in enumerate(class_names):
            sel = lab == i
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=9, alpha=0.75, color=colour(i), label=cls, linewidths=0)
        ax.set_title(f"{name} · {len(xy)} rows")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles and n <= 30:
        fig.legend(
            handles, names, loc="center right", title="class", markerscale=2.0, fontsize=8, frameon=False
        )
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (5.2 * len(maps) + 1.8), 1))
    _save(fig, path)


MISCLASSIFIED_COLUMNS = ["key", "true", "predicted", "probability", "split"]


def write_misclassified(
    path: Path,
    parts: Sequence[tuple[str, Sequence[str], np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
) -> dict[str, int]:
    """One row per wrong prediction of each split, where to look at the data: ``parts`` are (split, keys,
    true labels, predicted labels, probability of the predicted class), written in that order (test, then
    val), the most confident mistakes first within each. Returns the count per split. Runs written before
    the ``split`` column hold test rows only."""
    counts: dict[str, int] = {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MISCLASSIFIED_COLUMNS)
        for split, keys, y_true, y_pred, prob in parts:
            wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))
            wrong = wrong[np.argsort(-np.asarray(prob)[wrong], kind="stable")]
            counts[split] = len(wrong)
            for i in wrong:
                true, pred = class_names[int(y_true[i])], class_names[int(y_pred[i])]
                w.writerow([keys[i], true, pred, f"{prob[i]:.4f}", split])
    return counts


def read_misclassified(path: Path) -> list[dict[str, str]]:
    """``misclassified.csv``'s rows, each with its ``split`` (``test`` in a file from before that column)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{**row, "split": row.get("split") or "test"} for row in csv.DictReader(f)]


def plot_search(
    path: Path, points: Sequence[dict[str, Any]], scores: Sequence[float], columns: Sequence[str], title: str
) -> None:
    """One panel per column: score against its values (log axis for positive ranges over 2 decades)."""
    from pipeline.utils.io import atomic_path

    if not points:
        return
    plt = _plt()
    cols = [c for c in columns if any(c in p for p in points)]
    ncol = min(3, len(cols))
    nrow = -(-len(cols) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, col in zip(axes.flat, cols, strict=False):
        have = [(p[col], s) for p, s in zip(points, scores, strict=True) if col in p]
        values = [v for v, _ in have]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.scatter(values, [s for _, s in have], s=14, alpha=0.7)
            pos = [v for v in values if v > 0]
            if len(pos) == len(values) and max(pos) / min(pos) > 100:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            at = {lab: i for i, lab in enumerate(labels)}
            ax.scatter([at[str(v)] for v in values], [s for _, s in have], s=14, alpha=0.7)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([lab[:14] for lab in labels], rotation=30, ha="right", fontsize=7)
        ax.set_title(col, fontsize=9)
        ax.set_ylabel("score", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def plot_pr_curves(
    path: Path | BinaryIO,
    Y: np.ndarray,
    P: np.ndarray,
    class_names: Sequence[str],
    aps: Sequence[float | None],
    title: str,
) -> None:
    """One precision-recall curve per class of a multi-label split (``Y`` N×C multi-hot, ``P`` scores), its
    average precision (``aps``, as the run's metrics measured it) in the legend; a class without a positive
    row has no curve."""
    from sklearn.metrics import precision_recall_curve

    plt = _plt()
    n = len(class_names)
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for c, (name, ap) in enumerate(zip(class_names, aps, strict=True)):
        if not Y[:, c].any():
            continue
        prec, rec, _ = precision_recall_curve(Y[:, c], P[:, c])
        colour = cmap(c) if n <= 20 else cmap(c / max(1, n - 1))
        label = f"{name} (AP {ap:.3f})" if ap is not None else name
        ax.step(rec, prec, where="post", color=colour, label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if n <= 30:
        ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_cost(
    path: Path | BinaryIO,
    points: Sequence[dict[str, Any]],
    axes_keys: Sequence[tuple[str, str]],
    title: str,
    score: str = "test accuracy",
) -> None:
    """A score against a cost, one panel per ``(key, axis label)`` of ``axes_keys``: every point is a dict
    with ``label``, ``accuracy`` (the score, ``score`` on its axis: test accuracy, or a multi-label cache's
    test macro mAP) and those keys (a point without a key's value is left off that panel; one marked
    ``cached``, which had no extraction to measure, is named in the panel's corner instead)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(5.6 * len(axes_keys), 4.2), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], axes_keys, strict=True):
        cached = [str(p["label"])[:40] for p in points if p.get("cached") and p.get(key) is None]
        if cached:
            text = "cached (nothing extracted):\n" + "\n".join(cached[:6])
            ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=7, va="bottom", color="0.35")
        have = [p for p in points if isinstance(p.get(key), (int, float)) and p.get("accuracy") is not None]
        xs, ys = [float(p[key]) for p in have], [float(p["accuracy"]) for p in have]
        ax.scatter(xs, ys, s=28, color="tab:blue", zorder=3)
        mid = (min(xs) + max(xs)) / 2 if xs else 0.0
        for p, x, y in zip(have, xs, ys, strict=True):
            right = x > mid  # a label right of the middle is written leftwards, so it stays in the plot
            ax.annotate(
                str(p["label"])[:40], (x, y), textcoords="offset points", xytext=(-4 if right else 4, 4),
                ha="right" if right else "left", fontsize=7,
            )  # fmt: skip
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.margins(x=0.15, y=0.12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(score)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
