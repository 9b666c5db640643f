"""Multi-label heads: one binary linear classifier per class (one-vs-rest) on cached features, a decision
threshold per class chosen on the val split, and predictions as multi-hot rows.

The labels are the cache's N×C multi-hot matrix (``task = "multilabel"``). Each class is its own binary
problem, so a class's score is a probability of its own (``predict_proba`` of logistic regression, a sigmoid
of the margin for ridge and the linear SVM), not a share of a softmax.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from pipeline.cache.reader import Data
from pipeline.heads.fitting import Fitted, Predictions
from pipeline.heads.registry import make_head
from pipeline.heads.transforms import build_transforms
from pipeline.utils.errors import FeatcacheError, first_line

#: the heads a multi-label cache trains (each class one-vs-rest)
MULTILABEL_HEADS = ("logistic", "linear_svm", "ridge")


def check_multilabel_head(name: str, params: dict[str, Any]) -> None:
    """Refuse, in one line, what multi-label training does not do yet."""
    if name not in MULTILABEL_HEADS:
        raise FeatcacheError(
            f"head {name!r} does not train on a multi-label cache yet; use one of {', '.join(MULTILABEL_HEADS)}"
        )
    cw = params.get("class_weight")
    if cw is not None and cw != "balanced":
        raise FeatcacheError('a multi-label head takes class_weight = "balanced" only (weighted per class)')


def fit_multilabel(
    data: Data,
    train_rows: np.ndarray,
    head_name: str,
    params: dict[str, Any] | None = None,
    transforms: list[str] | tuple[str, ...] = ("standardize",),
    *,
    seed: int = 0,
) -> Fitted:
    """Fit ``transforms`` + one-vs-rest ``head_name`` on ``train_rows`` of a multi-label cache, in memory."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import Pipeline

    params = dict(params or {})
    check_multilabel_head(head_name, params)
    if data.streamed:
        raise FeatcacheError("multi-label heads train in memory only; set train.streaming = memory")
    t0 = time.perf_counter()
    train_rows = np.sort(np.asarray(train_rows))
    Y = data.labels[train_rows]
    counts = Y.sum(axis=0) if len(train_rows) else np.zeros(0)
    if len(train_rows) == 0 or counts.min() == 0 or counts.max() == len(train_rows):
        raise FeatcacheError(
            "multi-label training needs every class both present and absent in the train split"
            + (f" (class {int(np.argmin(counts))} is not)" if len(train_rows) else "")
        )
    head = make_head(head_name, params, seed=seed, n_train=len(train_rows))
    steps = build_transforms(
        list(transforms), streaming=False, n_samples=len(train_rows), n_features=data.n_features, seed=seed
    )
    X = data.take(train_rows)
    for _, est in steps:
        X = est.fit_transform(X)
    ovr = OneVsRestClassifier(head.estimator)
    fitted = Fitted(None, head, False, 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ovr.fit(X, Y)
        except (ValueError, TypeError) as e:
            raise FeatcacheError(f"head {head_name!r}: {first_line(e, 300)}") from None
    for w in caught:
        msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
        if msg not in fitted.notes and len(fitted.notes) < 8:
            fitted.notes.append(msg)
    fitted.model = Pipeline(steps + [("head", ovr)])
    fitted.seconds = time.perf_counter() - t0
    return fitted


def label_scores(model, X: np.ndarray) -> tuple[np.ndarray, bool]:
    """N×C per-class scores in [0, 1]; True when they are ``predict_proba``, False for sigmoid margins."""
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(X), np.float64), True
    d = np.asarray(model.decision_function(X), np.float64)
    return 1.0 / (1.0 + np.exp(-d)), False


def choose_thresholds(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Per class, the score threshold that maximizes F1 on (``Y``, ``P``); 0.5 for a class with no positive."""
    from sklearn.metrics import precision_recall_curve

    out = np.full(Y.shape[1], 0.5)
    for c in range(Y.shape[1]):
        if Y[:, c].sum() == 0 or Y[:, c].sum() == len(Y):
            continue
        prec, rec, thr = precision_recall_curve(Y[:, c], P[:, c])
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        out[c] = float(thr[int(np.argmax(f1))])
    return out


def above(P: np.ndarray, thresholds) -> np.ndarray:
    """The multi-hot prediction: 1 where a class's score reaches its threshold."""
    return (P >= np.asarray(thresholds, np.float64)[None, :]).astype(np.uint8)


def predict_multilabel(model, data: Data, rows: np.ndarray, thresholds=None) -> Predictions:
    """Scores of ``rows``; ``y_pred`` is the multi-hot prediction at ``thresholds`` (0.5 each when None)."""
    rows = np.sort(np.asarray(rows))
    Y = data.labels[rows]
    if len(rows):
        P, calibrated = label_scores(model, data.take(rows))
    else:
        P, calibrated = np.zeros(Y.shape, np.float64), True
    t = np.full(Y.shape[1], 0.5) if thresholds is None else thresholds
    return Predictions(rows, Y, above(P, t), P, calibrated)


def refuse_multilabel(stage: str, what: str) -> None:
    """The one line a stage that does not handle multi-label data yet answers with (exit 2 from the CLI)."""
    raise FeatcacheError(
        f"{stage}: {what} is multi-label, which {stage} does not support yet (multi-label works with "
        f"extract, train, predict, finetune and export)"
    )
