"""Multi-label heads: one binary linear classifier per class (one-vs-rest) or a Keras head with a sigmoid
per class, on cached features, a decision threshold per class chosen on the val split, and predictions as
multi-hot rows.

The labels are the cache's N×C multi-hot matrix (``task = "multilabel"``). Each class is its own binary
problem, so a class's score is a probability of its own (``predict_proba`` of logistic regression, a sigmoid
of the margin for ridge and the linear SVM), not a share of a softmax.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from pipeline.cache.reader import MEMORY_ONLY, Data
from pipeline.heads.fitting import Fitted, Predictions, Prepared, warning_notes
from pipeline.heads.registry import make_head
from pipeline.heads.transforms import build_transforms
from pipeline.utils.errors import FeatcacheError, first_line

#: heads that train one binary linear classifier per class (one-vs-rest)
OVR_HEADS = ("logistic", "linear_svm", "ridge")
#: heads that fit the whole multi-hot matrix at once: Keras with a sigmoid per class and binary cross-entropy
NATIVE_HEADS = ("keras_linear", "keras_mlp")
#: the heads a multi-label cache trains (``zeroshot``: a sigmoid per class, :mod:`pipeline.heads.zeroshot`)
MULTILABEL_HEADS = OVR_HEADS + NATIVE_HEADS + ("zeroshot",)

#: What a multi-label head gets when the configuration does not say (``train.params`` wins). Each class is a
#: binary problem on all the rows with about as many features as positives (1,280 features, ~1,000
#: positives a class on 3,000 mosaics), where the single-label default C = 1 overfits: macro mAP 0.84 on
#: test against 0.88 at C = 0.01 (the benchmark's 4,000 ten-class mosaics; 0.2 → 0.01 goes 0.85 → 0.88).
MULTILABEL_DEFAULTS: dict[str, dict[str, Any]] = {"logistic": {"C": 0.01}}


def check_multilabel_head(name: str, params: dict[str, Any]) -> None:
    """Refuse, in one line, what multi-label training does not do yet."""
    if name not in MULTILABEL_HEADS:
        raise FeatcacheError(
            f"head {name!r} does not train on a multi-label cache yet; use one of {', '.join(MULTILABEL_HEADS)}"
        )
    cw = params.get("class_weight")
    if cw is not None and cw not in ("balanced", "none"):  # "none": TOML's None
        raise FeatcacheError('a multi-label head takes class_weight = "balanced" only (weighted per class)')


def multilabel_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` over the multi-label defaults of head ``name`` (:data:`MULTILABEL_DEFAULTS`)."""
    return {**MULTILABEL_DEFAULTS.get(name, {}), **(params or {})}


def prepare_multilabel(data: Data, train_rows, es_rows, steps) -> Prepared:
    """Fit ``steps`` on ``train_rows`` and transform them (and ``es_rows``, early stopping's, when given);
    the targets are the rows of the multi-hot matrix."""
    X, Y = data.take(train_rows), data.labels[train_rows]
    for _, est in steps:
        X = est.fit_transform(X)
    prep = Prepared(steps, X, Y)
    if es_rows is not None and len(es_rows):
        Xv = data.take(es_rows)
        for _, est in steps:
            Xv = est.transform(Xv)
        prep.X_val, prep.y_val = Xv, data.labels[es_rows]
    return prep


def fit_prepared_multilabel(name: str, params: dict[str, Any], prep: Prepared, seed: int = 0):
    """The fitted head (one-vs-rest, or a Keras head on the whole matrix; early stopping on ``prep``'s
    val rows) and the solver's warnings, one line each."""
    from sklearn.multiclass import OneVsRestClassifier

    params = multilabel_params(name, params)
    check_multilabel_head(name, params)
    head = make_head(name, params, seed=seed, n_train=len(prep.y))
    est, kwargs = head.estimator, {}
    if name in OVR_HEADS:
        est = OneVsRestClassifier(est)
    elif prep.X_val is not None:
        kwargs["validation_data"] = (prep.X_val, prep.y_val)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            est.fit(prep.X, prep.y, **kwargs)
        except (ValueError, TypeError) as e:
            raise FeatcacheError(f"head {name!r}: {first_line(e, 300)}") from None
    return head, est, warning_notes(caught)


def constant_class(Y: np.ndarray) -> int | None:
    """The first class that every row of ``Y`` has, or none has (nothing to learn for it); None if none is."""
    counts = Y.sum(axis=0)
    bad = np.flatnonzero((counts == 0) | (counts == len(Y)))
    return int(bad[0]) if len(bad) else None


def fit_multilabel(
    data: Data,
    train_rows: np.ndarray,
    head_name: str,
    params: dict[str, Any] | None = None,
    transforms: list[str] | tuple[str, ...] = ("standardize",),
    *,
    seed: int = 0,
    val_rows: np.ndarray | None = None,
) -> Fitted:
    """Fit ``transforms`` + ``head_name`` on ``train_rows`` of a multi-label cache, in memory; ``val_rows``
    only steer a Keras head's early stopping."""
    from sklearn.pipeline import Pipeline

    params = multilabel_params(head_name, params)
    check_multilabel_head(head_name, params)
    if data.streamed:
        raise FeatcacheError(MEMORY_ONLY)
    t0 = time.perf_counter()
    train_rows = np.sort(np.asarray(train_rows))
    Y = data.labels[train_rows]
    bad = constant_class(Y)
    if len(train_rows) == 0 or bad is not None:
        raise FeatcacheError(
            "multi-label training needs every class both present and absent in the train split"
            + (f" (class {bad} is not)" if len(train_rows) else "")
        )
    steps = build_transforms(
        list(transforms), streaming=False, n_samples=len(train_rows), n_features=data.n_features, seed=seed
    )
    es_rows = np.sort(val_rows) if val_rows is not None and head_name in NATIVE_HEADS else None
    prep = prepare_multilabel(data, train_rows, es_rows, steps)
    head, est, notes = fit_prepared_multilabel(head_name, params, prep, seed)
    fitted = Fitted(Pipeline(steps + [("head", est)]), head, False, 0.0, notes=notes)
    fitted.history = getattr(est, "history_", None)
    fitted.seconds = time.perf_counter() - t0
    return fitted


def label_scores(model, X: np.ndarray) -> tuple[np.ndarray, bool]:
    """N×C per-class scores in [0, 1]; True when they are ``predict_proba``, False for sigmoid margins."""
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(X), np.float64), True
    return margin_scores(model.decision_function(X)), False


def margin_scores(d) -> np.ndarray:
    """Per-class scores in [0, 1] of a margin head (ridge, linear SVM): the sigmoid of its margins."""
    return 1.0 / (1.0 + np.exp(-np.asarray(d, np.float64)))


def choose_thresholds(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Per class, the score threshold that maximizes F1 on (``Y``, ``P``); 0.5 for a class with no positive."""
    from sklearn.metrics import precision_recall_curve

    out = np.full(Y.shape[1], 0.5)
    for c in range(Y.shape[1]):
        if Y[:, c].sum() == 0 or Y[:, c].sum() == len(Y):
            continue
        prec, rec, thr = precision_recall_curve(Y[:, c], P[:, c])
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        i = int(np.argmax(f1))
        # halfway to the next lower score: the same predictions on these rows, and no row sits exactly on
        # the threshold, where an exported model's rounding (1e-6) would flip it
        below = thr[i - 1] if i else max(0.0, 2 * thr[0] - thr[1] if len(thr) > 1 else thr[0])
        out[c] = float((below + thr[i]) / 2)
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
