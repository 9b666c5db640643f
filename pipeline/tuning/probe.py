"""The one linear-probe protocol ``featcache compare`` scores every candidate with (CLIP_benchmark style).

Features are L2-normalized; a multinomial logistic regression is fitted on the train split for every C in
:data:`C_GRID` and the C with the best val accuracy wins (ties: the smaller C, the stronger regularization);
it is refitted on train+val with that C and scored once on the test split: accuracy, macro-F1 and mean
per-class recall. A k-shot probe draws k train images per class (seeded, ``seeds`` draws), chooses C on
the same val split and reports the test accuracy's mean and standard deviation over the draws. Nothing else
is tuned, so the scores compare the features, not the effort spent on each head.

A multi-label cache (N×C multi-hot labels) gets the standard multi-label probe instead
(:func:`multilabel_probe`): the same L2-normalized features, one binary logistic regression per class
(one-vs-rest), C swept on train and chosen by val macro mAP; that model (no refit: val has chosen each class's
F1-best threshold, :func:`pipeline.heads.multilabel.choose_thresholds`) scores test: macro mAP, micro mAP and
macro-F1 at those thresholds. Its k-shot probe draws k train images *having* each class (their union; a class
that they all have, or none has, gets a constant score) and reports the test macro mAP.

A single-label cache of a text tower's joint space (CLIP/SigLIP, ``--pooling pooled``) also gets
CLIP_benchmark's zero-shot protocol (:func:`zero_shot`: the class-name classifier of ``[zeroshot]``'s
templates on val and test, no labels used) and the ``fewshot`` head on the same k-shot draws
(:func:`few_shot`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.heads.fitting import Predictions
from pipeline.heads.metrics import balanced_accuracy, macro_f1, multilabel_metrics
from pipeline.heads.multilabel import above, choose_thresholds, constant_class

#: the inverse regularization strengths swept on val
C_GRID = tuple(float(c) for c in np.logspace(-2, 4, 7))
MAX_ITER = 1000


@dataclass
class Split:
    """A split's L2-normalized features and labels."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> Split:
        x = np.asarray(x, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return cls(x / np.maximum(norms, 1e-12), np.asarray(y))


def _fit(train: Split, c: float):
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # a ConvergenceWarning at the largest C says nothing about the features
        return LogisticRegression(C=c, max_iter=MAX_ITER).fit(train.x, train.y)


def _accuracy(model, split: Split) -> float:
    return float(np.mean(model.predict(split.x) == split.y)) if len(split.y) else 0.0


def sweep(train: Split, val: Split) -> tuple[float, float, object]:
    """(best C, its val accuracy, its model) over :data:`C_GRID`; the smaller C wins a tie."""
    best = None
    for c in C_GRID:
        model = _fit(train, c)
        acc = _accuracy(model, val)
        if best is None or acc > best[1]:
            best = (c, acc, model)
    return best


def linear_probe(train: Split, val: Split, test: Split) -> dict[str, float]:
    """The protocol's scores: C chosen on val, the refit on train+val scored on test."""
    if len(np.unique(train.y)) < 2:
        raise ValueError("the train split holds fewer than two classes")
    c, val_acc, _ = sweep(train, val)
    both = Split(np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y]))
    model = _fit(both, c)
    yp = model.predict(test.x)
    return {
        "C": c,
        "val_accuracy": val_acc,
        "test_accuracy": float(np.mean(yp == test.y)) if len(test.y) else 0.0,
        "macro_f1": macro_f1(test.y, yp) if len(test.y) else 0.0,
        "mean_recall": balanced_accuracy(test.y, yp) if len(test.y) else 0.0,
    }


def k_shot_rows(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k train positions per class (all of a class that has fewer), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(picked))


def k_shot(train: Split, val: Split, test: Split, k: int, seeds: int) -> dict[str, float]:
    """Test accuracy (multi-label rows: macro mAP) of k-shot probes, C chosen on val each time: mean and std
    over ``seeds`` draws."""
    multi = train.y.ndim == 2
    scores = []
    for seed in range(seeds):
        rows = (multilabel_shot_rows if multi else k_shot_rows)(train.y, k, seed)
        few = Split(train.x[rows], train.y[rows])
        if multi:
            scores.append(_map_scores(multilabel_sweep(few, val)[2], test)["macro_map"])
        else:
            scores.append(_accuracy(sweep(few, val)[2], test))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores))}


def _fit_ovr(train: Split, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as _fit; and a class constant in a k-shot draw is scored constant
        return OneVsRestClassifier(LogisticRegression(C=c, max_iter=MAX_ITER)).fit(train.x, train.y)


def _map_scores(model, split: Split, thresholds=None) -> dict:
    """:func:`~pipeline.heads.metrics.multilabel_metrics` of ``model`` on ``split`` (0.5 thresholds: None)."""
    t = np.full(split.y.shape[1], 0.5) if thresholds is None else thresholds
    if not len(split.y):  # an empty split scores 0, as the single-label probe's accuracy does
        return {"macro_map": 0.0, "micro_map": 0.0, "macro_f1": 0.0, "proba": np.zeros(split.y.shape)}
    P = np.asarray(model.predict_proba(split.x), np.float64)
    pred = Predictions(np.arange(len(split.y)), split.y, above(P, t), P, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return multilabel_metrics(pred, [str(i) for i in range(split.y.shape[1])], t) | {"proba": P}


def multilabel_sweep(train: Split, val: Split) -> tuple[float, dict, object]:
    """(best C, its val scores, its model) by val macro mAP over :data:`C_GRID`; the smaller C wins a tie."""
    best = None
    for c in C_GRID:
        model = _fit_ovr(train, c)
        scores = _map_scores(model, val)
        if best is None or scores["macro_map"] > best[1]["macro_map"]:
            best = (c, scores, model)
    return best


def multilabel_probe(train: Split, val: Split, test: Split) -> dict[str, float | None]:
    """The multi-label protocol's scores: C by val macro mAP, thresholds on val, that model on test."""
    if len(train.y) == 0:
        raise ValueError("the train split is empty")
    bad = constant_class(train.y)
    if bad is not None:
        raise ValueError(f"class {bad} is not both present and absent in the train split")
    c, val_scores, model = multilabel_sweep(train, val)
    thresholds = choose_thresholds(val.y, val_scores["proba"])
    test_scores = _map_scores(model, test, thresholds)
    return {
        "C": c,
        "val_accuracy": None,
        "test_accuracy": None,
        "val_map": val_scores["macro_map"],
        "test_map": test_scores.get("macro_map", 0.0),
        "micro_map": test_scores.get("micro_map", 0.0),
        "macro_f1": test_scores.get("macro_f1", 0.0),
        "mean_recall": None,
    }


def multilabel_shot_rows(Y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The union of k train positions having each class (all of a class that has fewer), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(Y[:, c]))[:k] for c in range(Y.shape[1])]
    return np.unique(np.concatenate(picked))


def zero_shot(text: dict, val: Split, test: Split) -> dict[str, float]:
    """CLIP_benchmark's zero-shot protocol: the class-name classifier (``text``: the parameters of
    :class:`~pipeline.heads.zeroshot.ZeroShotClassifier`) scored on val and test, no image labels used."""
    from pipeline.heads.zeroshot import ZeroShotClassifier

    est = ZeroShotClassifier(**text).fit(np.zeros((1, test.x.shape[1])))
    yv, yt = (est.predict(s.x) if len(s.y) else s.y for s in (val, test))
    return {
        "zeroshot_val": float(np.mean(yv == val.y)) if len(val.y) else 0.0,
        "zeroshot_test": float(np.mean(yt == test.y)) if len(test.y) else 0.0,
        "zeroshot_mean_recall": balanced_accuracy(test.y, yt) if len(test.y) else 0.0,
    }


def few_shot(text: dict, train: Split, val: Split, test: Split, k: int, seeds: int) -> dict[str, float]:
    """Test accuracy of the ``fewshot`` head (default C, its mix chosen on val) on the k-shot draws
    :func:`k_shot` fits the logistic probe on: mean and std over ``seeds`` draws."""
    from pipeline.heads.zeroshot import FewShotClassifier

    scores = []
    for seed in range(seeds):
        rows = k_shot_rows(train.y, k, seed)
        est = FewShotClassifier(**text).fit(train.x[rows], train.y[rows], X_val=val.x, y_val=val.y)
        scores.append(float(np.mean(est.predict(test.x) == test.y)) if len(test.y) else 0.0)
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores))}


def score_layer(cache, layer: str, shots: list[int], seeds: int, text: dict | None = None) -> dict:
    """The protocol on one layer of an open :class:`~pipeline.cache.store.FeatureCache`; with ``text`` (a
    text tower's zero-shot parameters, single-label caches) also the zero-shot scores and the ``fewshot``
    head's k-shot scores.

    The fits are many and small: on one BLAS thread each, which on a busy machine is many times faster
    than threads fighting over the cores (and the scores are the same)."""
    from threadpoolctl import threadpool_limits

    train, val, test = (Split.of(*cache.xy(s, layer)) for s in ("train", "val", "test"))
    probe = multilabel_probe if cache.multilabel else linear_probe
    with threadpool_limits(limits=1, user_api="blas"):
        out: dict = probe(train, val, test)
        out["shots"] = {str(k): k_shot(train, val, test, k, seeds) for k in shots}
        if text is not None and not cache.multilabel:
            out |= zero_shot(text, val, test)
            out["fewshot_shots"] = {str(k): few_shot(text, train, val, test, k, seeds) for k in shots}
    out["dim"] = int(train.x.shape[1])
    return out
