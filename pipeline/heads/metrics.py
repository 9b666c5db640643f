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


PROBA_FLOOR = 1e-15  # a probability of 0 scores as this: one sure mistake costs -log(1e-15) ≈ 34.5


def class_log_loss(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean -log p(true class): ``proba``'s columns are ``classes`` (sorted; a class missing there has
    probability 0), each row renormalized after the floor. A run's val/test log loss and a search trial's."""
    y, classes = np.asarray(y), np.asarray(classes)
    if not len(y):
        return float("nan")
    p = np.clip(np.asarray(proba, np.float64), PROBA_FLOOR, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    col = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    p_true = np.where(classes[col] == y, p[np.arange(len(y)), col], PROBA_FLOOR)
    return float(-np.mean(np.log(np.maximum(p_true, PROBA_FLOOR))))


def binary_log_loss(Y: np.ndarray, P: np.ndarray) -> float:
    """Multi-label log loss: the binary log loss of each class's score, averaged over classes (every class
    weighs the same, as macro mAP does)."""
    Y = np.asarray(Y, np.float64)
    P = np.clip(np.asarray(P, np.float64), PROBA_FLOOR, 1.0 - PROBA_FLOOR)
    return float(-np.mean(Y * np.log(P) + (1.0 - Y) * np.log(1.0 - P)))


def classification_metrics(pred: Predictions, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall, log loss, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
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
            out["log_loss"] = class_log_loss(y, pred.proba, np.arange(len(class_names)))
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


def class_aps(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Average precision of each class's scores; NaN for a class with no positive row (AP is undefined)."""
    from sklearn.metrics import average_precision_score

    ap = np.full(Y.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in np.flatnonzero(Y.sum(axis=0) > 0):
            ap[c] = average_precision_score(Y[:, c], P[:, c])
    return ap


def macro_map(Y: np.ndarray, P: np.ndarray) -> float:
    """Macro mAP: the mean AP over the classes with a positive row (0 when none has): a search's score."""
    ap = class_aps(Y, P)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def micro_map(Y: np.ndarray, P: np.ndarray) -> float:
    """AP of every (row, class) score pooled: the frequent classes weigh more."""
    from sklearn.metrics import average_precision_score

    if not Y.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(average_precision_score(Y, P, average="micro"))


def multilabel_metrics(pred: Predictions, class_names: list[str], thresholds) -> dict[str, Any]:
    """Macro/micro mAP, per-class AP, micro/macro F1 at ``thresholds``, subset accuracy, label cardinality.

    Macro scores average the classes with a positive row in the split (AP is undefined without one);
    ``map_baseline`` is the macro mAP of a constant score (each class's frequency), the floor to beat."""
    from sklearn.metrics import precision_recall_fscore_support

    Y, Yp, P = pred.y_true, pred.y_pred, pred.proba
    if len(Y) == 0:
        return {"n": 0}
    support = Y.sum(axis=0)
    present = np.flatnonzero(support > 0)
    ap = class_aps(Y, P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, rec, f1, _ = precision_recall_fscore_support(Y, Yp, average=None, zero_division=0)
        micro = precision_recall_fscore_support(Y, Yp, average="micro", zero_division=0)
    return {
        "n": int(len(Y)),
        "macro_map": macro_map(Y, P),
        "micro_map": micro_map(Y, P),
        "map_baseline": float(np.mean(support[present] / len(Y))) if len(present) else 0.0,
        "macro_f1": float(np.mean(f1[present])) if len(present) else 0.0,
        "micro_f1": float(micro[2]),
        "subset_accuracy": float(np.mean(np.all(Y == Yp, axis=1))),
        "label_cardinality": float(Y.sum(axis=1).mean()),
        "predicted_cardinality": float(Yp.sum(axis=1).mean()),
        "no_label": int((Y.sum(axis=1) == 0).sum()),
        "per_class": {
            name: {
                "ap": None if np.isnan(ap[i]) else float(ap[i]),
                "threshold": float(thresholds[i]),
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
    }
