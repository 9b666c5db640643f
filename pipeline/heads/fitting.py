"""Fitting a head on cached rows (in memory or streamed) and predicting rows, with the same scores for all."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.cache.reader import Data
from pipeline.heads.keras_head import class_weights
from pipeline.heads.registry import Head, make_head, sgd_step
from pipeline.heads.transforms import (
    blocked_pca,
    build_transforms,
    fit_transform_blocks,
    fit_transform_owned,
    transform_blocks,
)
from pipeline.utils.errors import FeatcacheError, first_line

FULL_BATCH_BYTES = 64 << 20  # a full-batch streamed fit reads chunks of about this many bytes


@dataclass
class Fitted:
    """A fitted Pipeline and how it was fitted."""

    model: Any  # sklearn Pipeline: transforms + ("head", estimator)
    head: Head
    streamed: bool
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)  # partial_fit_calls, generator_batches, chunk_reads
    history: dict[str, list[float]] | None = None
    notes: list[str] = field(default_factory=list)


def _apply(steps, X):
    for _, est in steps:
        X = est.transform(X)
    return X


def _sample_weight(head: Head, classes: np.ndarray, y_all: np.ndarray, y: np.ndarray):
    weights = class_weights(classes, y_all, head.class_weight)
    if not weights:
        return None
    return np.asarray([weights[int(i)] for i in np.searchsorted(classes, y)], np.float64)


def warning_notes(caught, notes: list[str] | None = None, limit: int | None = 8) -> list[str]:
    """``notes`` and one line for each distinct UserWarning or RuntimeWarning (a solver's ConvergenceWarning
    is one) in ``caught``, at most ``limit`` lines in all: what a fit reports beside its scores."""
    out = list(notes or [])
    for w in caught:
        msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
        if issubclass(w.category, (UserWarning, RuntimeWarning)) and msg not in out:
            if limit is not None and len(out) >= limit:
                break
            out.append(msg)
    return out


def fit_model(
    data: Data,
    train_rows: np.ndarray,
    val_rows: np.ndarray | None,
    head_name: str,
    params: dict[str, Any] | None = None,
    transforms: list[str] | tuple[str, ...] = ("standardize",),
    *,
    seed: int = 0,
    chunk_rows: int = 1024,
    train_X: np.ndarray | None = None,
) -> Fitted:
    """Fit ``transforms`` + head on ``train_rows``; ``val_rows`` (may be None) only steers early stopping.
    ``train_X``: the features of the sorted ``train_rows``, already read, which the fit may overwrite (the
    transforms run in place): ``data`` then need not hold the train rows."""
    from sklearn.pipeline import Pipeline

    t0 = time.perf_counter()
    train_rows = np.sort(np.asarray(train_rows))
    if len(train_rows) == 0:
        raise FeatcacheError("no training rows: the cache's train split is empty")
    has_val = val_rows is not None and len(val_rows) > 0
    streamed = data.streamed
    head = make_head(head_name, params, seed=seed, streaming=streamed, n_train=len(train_rows))
    steps = build_transforms(
        list(transforms), streaming=streamed, n_samples=len(train_rows), n_features=data.n_features, seed=seed
    )
    y = data.labels[train_rows]
    if len(np.unique(y)) < 2:
        raise FeatcacheError("the training rows hold a single class; a classifier needs at least two")
    fitted = Fitted(None, head, streamed, 0.0)
    if head.ignored:
        fitted.notes.append(
            f"ignored in {'streaming' if streamed else 'memory'} mode: {', '.join(head.ignored)}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if streamed:
            _fit_streamed(
                data, train_rows, val_rows if has_val else None, head, steps, fitted, chunk_rows, seed
            )
        else:
            val = val_rows if has_val and head.val_kwargs is not None else None
            fit_prepared(head, prepare(data, train_rows, val, steps, train_X))
    fitted.notes = warning_notes(caught, fitted.notes)
    fitted.model = Pipeline(steps + [("head", head.estimator)])
    fitted.history = getattr(head.estimator, "history_", None)
    fitted.seconds = time.perf_counter() - t0
    return fitted


def _fit_head(head: Head, X, y, fit_kwargs):
    try:
        head.estimator.fit(X, y, **fit_kwargs)
    except FeatcacheError:
        raise
    except (ValueError, TypeError) as e:  # sklearn's parameter validation: a bad value is a user error
        raise FeatcacheError(f"head {head.name!r}: {first_line(e, 300)}") from None


@dataclass
class Prepared:
    """Transforms fitted on the fit rows, and the matrices they produce: reusable by every head on that chain."""

    steps: list[tuple[str, Any]]
    X: np.ndarray
    y: np.ndarray
    X_val: np.ndarray | None = None  # early-stopping rows whose class is seen in ``y``
    y_val: np.ndarray | None = None


def prepare(data: Data, train_rows, val_rows, steps, train_X: np.ndarray | None = None) -> Prepared:
    """Fit ``steps`` (unfitted transforms) on ``train_rows`` and transform them and ``val_rows`` (may be
    None); ``train_X``: the train rows' features already read, transformed in place (else read here: in
    blocks when the chain ends in a PCA, :func:`~pipeline.heads.transforms.blocked_pca`)."""
    y = data.labels[train_rows]
    blocked = blocked_pca(steps)
    if train_X is None and blocked:  # read a block at a time: only the PCA's output is held
        X = fit_transform_blocks(steps, lambda lo, hi: data.take(train_rows[lo:hi]), len(train_rows))
    else:
        X = data.take(train_rows) if train_X is None else train_X  # a fresh array: transformed in place
        for _, est in steps[:-1] if blocked else steps:
            X = fit_transform_owned(est, X)
        if blocked:  # the PCA fitted on the same blocks as the path above: both give the same matrix
            X = fit_transform_blocks(steps[-1:], lambda lo, hi, X=X: X[lo:hi], len(X))
    prep = Prepared(steps, X, y)
    if val_rows is not None:
        val_rows = val_rows[
            np.isin(data.labels[val_rows], y)
        ]  # a class unseen in train cannot steer stopping
        if len(val_rows):
            prep.X_val, prep.y_val = transform_rows(steps, data, val_rows), data.labels[val_rows]
    return prep


def transform_rows(steps, data: Data, rows: np.ndarray) -> np.ndarray:
    """Fitted ``steps`` applied to ``rows`` (at least one) of ``data``, read a block at a time."""
    return transform_blocks(steps, lambda lo, hi: data.take(rows[lo:hi]), len(rows))


def fit_prepared(head: Head, prep: Prepared) -> None:
    """Fit ``head`` on prepared rows exactly as an independent in-memory fit would."""
    kwargs: dict[str, Any] = {}
    if prep.X_val is not None and head.val_kwargs is not None:
        kwargs = head.val_kwargs(prep.X_val, prep.y_val)
    if head.class_weight is not None:
        kwargs["sample_weight"] = _sample_weight(head, np.unique(prep.y), prep.y, prep.y)
    _fit_head(head, prep.X, prep.y, kwargs)


def _fit_streamed(
    data: Data, train_rows, val_rows, head: Head, steps, fitted: Fitted, chunk_rows: int, seed: int
) -> None:
    stats = fitted.stats
    stats.update(partial_fit_calls=0, generator_batches=0, chunk_reads=0, transform_passes=0)
    # transforms, in order: each learns from chunks already passed through the steps before it
    for i, (_, est) in enumerate(steps):
        if not hasattr(est, "partial_fit"):  # stateless (Normalizer): one small chunk fixes its input width
            X0, _ = data.chunks(train_rows[:64], 64)[0]
            est.fit(_apply(steps[:i], X0))
            continue
        need = int(getattr(est, "n_components", None) or 1)
        # IncrementalPCA's SVD costs ~ (k + b)² per chunk of b rows: chunks of a few k are cheapest
        size = chunk_rows if need == 1 else min(chunk_rows, max(4 * need, 256))
        seq = data.chunks(train_rows, max(size, need), min_rows=need)
        for X, _ in seq:
            est.partial_fit(_apply(steps[:i], X))
        stats["chunk_reads"] += seq.reads
        stats["transform_passes"] += 1
    transform = (lambda X: _apply(steps, X)) if steps else None
    y_all = data.labels[train_rows]
    classes = np.unique(y_all)
    est = head.estimator
    if head.kind == "keras":
        seq = data.chunks(train_rows, int(est.batch_size), shuffle=True, seed=seed, transform=transform)
        if val_rows is not None:
            val_rows = val_rows[np.isin(data.labels[val_rows], classes)]
        val = (
            data.chunks(val_rows, 4096, transform=transform)
            if val_rows is not None and len(val_rows)
            else None
        )
        try:
            est.fit_stream(seq, val, y_all=y_all)
        except (ValueError, TypeError) as e:
            raise FeatcacheError(f"head {head.name!r}: {first_line(e, 300)}") from None
        stats["generator_batches"] = int(est.stream_batches_)
        stats["chunk_reads"] += seq.reads + (val.reads if val is not None else 0)
        return
    if head.full_batch:  # one loss and gradient per pass over the chunks, in file order: no shuffling
        seq = data.chunks(
            train_rows, max(chunk_rows, FULL_BATCH_BYTES // (4 * data.n_features)), transform=transform
        )
        try:
            est.fit_chunks(seq, y_all)
        except (ValueError, TypeError) as e:
            raise FeatcacheError(f"head {head.name!r}: {first_line(e, 300)}") from None
        stats["passes"] = int(est.n_passes_)
        stats["chunk_reads"] += seq.reads
        return
    seq = data.chunks(train_rows, chunk_rows, shuffle=True, seed=seed, transform=transform)
    if head.auto_step:
        est.set_params(eta0=sgd_step(seq[0][0]))
        stats["eta0"] = est.eta0
    for _ in range(head.epochs):
        for X, y in seq:
            try:
                est.partial_fit(X, y, classes=classes, sample_weight=_sample_weight(head, classes, y_all, y))
            except (ValueError, TypeError) as e:
                raise FeatcacheError(f"head {head.name!r}: {first_line(e, 300)}") from None
            stats["partial_fit_calls"] += 1
        seq.on_epoch_end()
    stats["chunk_reads"] += seq.reads


@dataclass
class Predictions:
    rows: np.ndarray  # sorted cache rows
    y_true: np.ndarray
    y_pred: np.ndarray
    proba: np.ndarray  # n × n_classes of the cache (columns = cache class indices)
    calibrated: bool  # False: softmax of decision scores (margin heads), not probabilities


def decision_scores(model, X) -> tuple[np.ndarray, bool]:
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(X), np.float64), True
    d = np.asarray(model.decision_function(X), np.float64)
    if d.ndim == 1:
        d = np.stack([-d / 2, d / 2], axis=1)  # softmax([−s/2, s/2]) = sigmoid(s)
    d = d - d.max(axis=1, keepdims=True)
    e = np.exp(d)
    return e / e.sum(axis=1, keepdims=True), False


def predict_rows(model, data: Data, rows: np.ndarray, n_classes: int, batch_rows: int = 4096) -> Predictions:
    """Predict ``rows`` in chunks (bounded memory when streamed); probabilities spread to all cache classes."""
    rows = np.sort(np.asarray(rows))
    head_classes = np.asarray(model.steps[-1][1].classes_).astype(np.int64)
    out_p, calibrated = [], True
    if data.streamed:
        for X, _ in data.chunks(rows, batch_rows):
            p, calibrated = decision_scores(model, X)
            out_p.append(p)
    elif len(rows):
        p, calibrated = decision_scores(model, data.take(rows))
        out_p.append(p)
    p = np.concatenate(out_p) if out_p else np.zeros((0, len(head_classes)))
    full = np.zeros((len(rows), n_classes), np.float64)
    full[:, head_classes] = p
    y_pred = head_classes[np.argmax(p, axis=1)] if len(rows) else np.zeros(0, np.int64)
    return Predictions(rows, data.labels[rows], y_pred, full, calibrated)


def predict_prepared(estimator, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted class labels of already transformed rows, as :func:`predict_rows` picks them, and their
    class probabilities (columns: ``estimator.classes_``) when the head has them (None: a margin head)."""
    p, calibrated = decision_scores(estimator, X)
    return np.asarray(estimator.classes_).astype(np.int64)[np.argmax(p, axis=1)], p if calibrated else None
