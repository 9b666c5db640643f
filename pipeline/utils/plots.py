"""Run reports drawn with matplotlib (imported lazily): confusion matrices, learning curves, misclassified rows."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, cm: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> None:
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    path: Path, history: dict[str, list[float]], title: str, epoch0: dict[str, float] | None = None
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_misclassified(
    path: Path,
    keys: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    prob: np.ndarray,
    class_names: Sequence[str],
) -> int:
    """One row per wrong test prediction, most confident mistakes first: where to look at the data."""
    wrong = np.flatnonzero(y_true != y_pred)
    wrong = wrong[np.argsort(-prob[wrong], kind="stable")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "true", "predicted", "probability"])
        for i in wrong:
            w.writerow([keys[i], class_names[int(y_true[i])], class_names[int(y_pred[i])], f"{prob[i]:.4f}"])
    return len(wrong)
