"""Classification metrics in one place: train, search and finetune score predictions here."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from pipeline.heads.fitting import Predictions


def balanced_accuracy(y, yp) -> float:
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y, yp))


def macro_f1(y, yp) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, yp, average="macro", labels=np.unique(y), zero_division=0))


def classification_metrics(pred: Predictions, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall, log loss, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
    )

    labels = list(range(len(class_names)))
    y, yp = pred.y_true, pred.y_pred
    if len(y) == 0:
        return {"n": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, rec, f1, support = precision_recall_fscore_support(y, yp, labels=labels, zero_division=0)
        present = [i for i in labels if support[i] > 0]
        out: dict[str, Any] = {
            "n": int(len(y)),
            "accuracy": float(accuracy_score(y, yp)),
            "balanced_accuracy": float(balanced_accuracy_score(y, yp)),
            "macro_f1": float(np.mean(f1[present])) if present else 0.0,
            "log_loss": None,
        }
        if pred.calibrated:
            p = np.clip(pred.proba, 1e-15, 1.0)
            out["log_loss"] = float(log_loss(y, p / p.sum(axis=1, keepdims=True), labels=labels))
    out["per_class"] = {
        name: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    out["confusion_matrix"] = confusion_matrix(y, yp, labels=labels).tolist()
    return out
