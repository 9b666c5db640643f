"""The one linear-probe protocol ``featcache compare`` scores every candidate with (CLIP_benchmark style).

Features are L2-normalized; a multinomial logistic regression is fitted on the train split for every C in
:data:`C_GRID` and the C with the best val accuracy wins (ties: the smaller C, the stronger regularization);
it is refitted on train+val with that C and scored once on the test split: accuracy, macro-F1 and mean
per-class recall. A k-shot probe draws k train images per class (seeded, ``seeds`` draws), chooses C on
the same val split and reports the test accuracy's mean and standard deviation over the draws. Nothing else
is tuned, so the scores compare the features, not the effort spent on each head.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.heads.metrics import balanced_accuracy, macro_f1

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
    """Test accuracy of k-shot probes (C chosen on val each time): mean and std over ``seeds`` draws."""
    scores = []
    for seed in range(seeds):
        rows = k_shot_rows(train.y, k, seed)
        _, _, model = sweep(Split(train.x[rows], train.y[rows]), val)
        scores.append(_accuracy(model, test))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores))}


def score_layer(cache, layer: str, shots: list[int], seeds: int) -> dict:
    """The protocol on one layer of an open :class:`~pipeline.cache.store.FeatureCache`.

    The fits are many and small: on one BLAS thread each, which on a busy machine is many times faster
    than threads fighting over the cores (and the scores are the same)."""
    from threadpoolctl import threadpool_limits

    train, val, test = (Split.of(*cache.xy(s, layer)) for s in ("train", "val", "test"))
    with threadpool_limits(limits=1, user_api="blas"):
        out: dict = linear_probe(train, val, test)
        out["shots"] = {str(k): k_shot(train, val, test, k, seeds) for k in shots}
    out["dim"] = int(train.x.shape[1])
    return out
