"""Running trials: fit and score one candidate on every fold, in a worker that shares work across trials.

A worker keeps what consecutive trials have in common: each (layer, transform chain, fold) fitted once and
its matrices kept (a few), and each head's path (:mod:`pipeline.heads.paths`) continued from the last
configuration on it. Shared or not, a trial scores as an independent fit would. Everything a worker
returns is plain data, so it can run in another process or on a cluster.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.heads.fitting import warning_notes
from pipeline.heads.metrics import (
    balanced_accuracy,
    binary_log_loss,
    class_log_loss,
    macro_f1,
    macro_map,
    micro_map,
)
from pipeline.tuning.folds import Plan, subset_rows
from pipeline.tuning.space import Candidate
from pipeline.utils.errors import FeatcacheError

# k-fold CV: a trial whose mean over its first folds is this far below the leader stops there ("pruned")
PRUNE_MARGIN = 0.10
PREPARED_KEPT = 4  # transformed (layer, chain, fold) matrices a worker keeps for the next trials
PREPARED_FREE_BYTES = 256 << 20  # ... within the features' size, or this much when they are smaller


def _failed(e: Exception, t0: float) -> dict[str, Any]:
    """A trial's record when its fit raised: the first line of why."""
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return {
        "status": "failed",
        "error": msg if isinstance(e, FeatcacheError) else f"{type(e).__name__}: {msg}",
        "seconds": time.perf_counter() - t0,
    }


def _scored(scores: dict[str, list[float]], notes: list[str], t0: float, c0: float) -> dict[str, Any]:
    """A finished trial's record: fold means (the first of ``scores`` is the score: accuracy, or macro mAP
    on a multi-label cache), the val log loss (None: a margin head has no probabilities), time and the
    solver's warnings."""
    main = next(iter(scores.values()))
    return {
        "status": "ok",
        "score": float(np.mean(main)),
        "score_std": float(np.std(main)) if len(main) > 1 else 0.0,
        "log_loss": None,
        **{name: float(np.mean(v)) for name, v in list(scores.items())[1:]},
        "folds": len(main),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "pid": os.getpid(),
        "warning": "; ".join(notes[:3]),
    }


def run_trial(data, cand: Candidate, plan: Plan, fraction: float, seed: int) -> dict[str, Any]:
    """Fit and score one candidate (all folds). Runs in a joblib worker; returns plain data only."""
    from pipeline.heads.fitting import fit_model, predict_rows

    t0, c0 = time.perf_counter(), time.process_time()
    scores: dict[str, list[float]] = {}
    notes: list[str] = []
    try:
        for fold, (fit_rows, _, _) in enumerate(plan.folds):
            rows = subset_rows(fit_rows, plan.rank, fraction)
            eval_rows, es_rows = plan.scored_rows(fold, fraction)
            params = plan.fit_params(cand.head, cand.params)
            fitted = fit_model(data, rows, es_rows, cand.head, params, list(cand.transforms), seed=seed)
            notes += [n for n in fitted.notes if n not in notes]
            pred = predict_rows(fitted.model, data, eval_rows, plan.n_classes)
            proba = pred.proba if pred.calibrated else None
            _add(scores, fold_scores(pred.y_true, pred.y_pred, False, proba, np.arange(plan.n_classes)))
    except Exception as e:  # noqa: BLE001 - one failing candidate must not end the search
        return _failed(e, t0)
    return _scored(scores, notes, t0, c0)


def fold_scores(
    y_true: np.ndarray,
    pred: np.ndarray,
    multilabel: bool,
    proba: np.ndarray | None = None,
    classes: np.ndarray | None = None,
) -> dict[str, float]:
    """One fold's scores, the trial's score first: accuracy (of predicted labels), or macro mAP (of N×C
    per-class scores) on a multi-label cache; ``log_loss`` when the head gives probabilities (``proba``,
    its columns ``classes``; on a multi-label cache ``pred`` itself): a search's first tie-break."""
    if multilabel:
        out = {"macro_map": macro_map(y_true, pred), "micro_map": micro_map(y_true, pred)}
        return out | ({"log_loss": binary_log_loss(y_true, pred)} if proba is not None else {})
    out = {
        "accuracy": float(np.mean(y_true == pred)),
        "balanced_accuracy": balanced_accuracy(y_true, pred),
        "macro_f1": macro_f1(y_true, pred),
    }
    return out | ({"log_loss": class_log_loss(y_true, proba, classes)} if proba is not None else {})


def _add(scores: dict[str, list[float]], fold: dict[str, float]) -> None:
    for name, v in fold.items():
        scores.setdefault(name, []).append(v)


@dataclass
class WorkerState:
    """A worker's state: the data, and what its trials share (prepared chains, paths), most recent last."""

    data: dict
    plan: Plan
    seed: int
    prepared: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def worker_init(state) -> WorkerState:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    data, plan, seed = state
    return WorkerState(data, plan, seed)


def worker_run(shared: WorkerState, task, emit) -> None:
    """Run a task's trials back to back, emitting ``(candidate, record)`` as each finishes."""
    for cand in task.cands:
        data = shared.data[cand.layer]
        if data.streamed:
            emit((cand, run_trial(data, cand, shared.plan, task.fraction, shared.seed)))
        else:
            emit((cand, shared_trial(shared, cand, task.fraction, task.leader)))


def _prepared(shared: WorkerState, cand: Candidate, fold: int, fraction: float):
    """Transforms of ``cand``'s chain fitted on this fold's fit rows, once per worker (a few kept)."""
    from pipeline.heads.fitting import prepare, transform_rows
    from pipeline.heads.multilabel import prepare_multilabel
    from pipeline.heads.transforms import blocked_pca, build_transforms

    key = (cand.layer, cand.transforms, fold, fraction)
    if key in shared.prepared:
        shared.prepared[key] = shared.prepared.pop(key)  # most recently used last
        return key, shared.prepared[key]
    data = shared.data[cand.layer]
    rows = subset_rows(shared.plan.folds[fold][0], shared.plan.rank, fraction)
    eval_rows, es_rows = shared.plan.scored_rows(fold, fraction)
    steps = build_transforms(
        list(cand.transforms), n_samples=len(rows), n_features=data.n_features, seed=shared.seed
    )
    blocked = blocked_pca(steps) and not shared.plan.multilabel  # prepare_multilabel reads its rows whole
    width = steps[-1][1].n_components if blocked else data.n_features  # what the chain holds
    _make_room(shared, len(rows) * width * 4, data)
    es_rows = es_rows if es_rows is not None and len(es_rows) else None
    if shared.plan.multilabel:
        prep = prepare_multilabel(data, np.sort(rows), None if es_rows is None else np.sort(es_rows), steps)
    else:
        prep = prepare(data, np.sort(rows), es_rows, steps)
    eval_rows = np.sort(eval_rows)
    X_eval = transform_rows(steps, data, eval_rows)
    shared.prepared[key] = (prep, X_eval, data.labels[eval_rows])
    return key, shared.prepared[key]


def _nbytes(entry) -> int:
    prep, X_eval, _ = entry
    return int(prep.X.nbytes + X_eval.nbytes + (prep.X_val.nbytes if prep.X_val is not None else 0))


def _make_room(shared: WorkerState, need: int, data) -> None:
    """Drop the least recently used prepared matrices (and the paths on them) until a new one of ``need``
    bytes fits: at most PREPARED_KEPT of them, and together no more than the features the worker holds
    (at a million rows one full-size chain at a time: a search's memory stays ~2× its features)."""
    held = data.X.nbytes if data.X is not None else 0
    while shared.prepared and (
        len(shared.prepared) >= PREPARED_KEPT
        or sum(_nbytes(e) for e in shared.prepared.values()) + need > max(held, need, PREPARED_FREE_BYTES)
    ):
        old = next(iter(shared.prepared))
        del shared.prepared[old]
        shared.paths = {k: v for k, v in shared.paths.items() if k[0] != old}


def _fit_predict(
    shared: WorkerState, cand: Candidate, prep_key, prep, X_eval
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Predictions of ``cand`` fitted on prepared rows (labels; N×C scores on a multi-label cache), their
    probabilities (None: a margin head's), continuing the path its head left on them, and the solver
    warnings a multi-label fit recorded."""
    from pipeline.heads.paths import fit_predict_on_path, fit_scores_on_path, path_group

    path_key = (prep_key, cand.head, path_group(cand.head, cand.params))
    params = shared.plan.fit_params(cand.head, cand.params)
    args = (cand.head, params, prep, X_eval, shared.paths.get(path_key), shared.seed)
    notes: list[str] = []
    if shared.plan.multilabel:
        y_pred, calibrated, kept, notes = fit_scores_on_path(*args)
        proba = y_pred if calibrated else None
    else:
        y_pred, proba, kept = fit_predict_on_path(*args)
    if kept is not None:
        shared.paths[path_key] = kept
    return y_pred, proba, notes


def shared_trial(
    shared: WorkerState, cand: Candidate, fraction: float, leader: float | None
) -> dict[str, Any]:
    """:func:`run_trial` on work shared across trials; stops early when a fold leaves it far behind ``leader``."""
    t0, c0 = time.perf_counter(), time.process_time()
    scores: dict[str, list[float]] = {}
    notes: list[str] = []
    n_folds = len(shared.plan.folds)
    try:
        for fold in range(n_folds):
            prep_key, (prep, X_eval, y_eval) = _prepared(shared, cand, fold, fraction)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y_pred, proba, recorded = _fit_predict(shared, cand, prep_key, prep, X_eval)
            notes += [n for n in warning_notes(caught, limit=None) + recorded if n not in notes]
            classes = None if shared.plan.multilabel else np.unique(prep.y)
            if proba is not None and not shared.plan.multilabel and proba.shape[1] == shared.plan.n_classes:
                classes = np.arange(shared.plan.n_classes)  # a text head scores every class, seen or not
            _add(scores, fold_scores(y_eval, y_pred, shared.plan.multilabel, proba, classes))
            accs = next(iter(scores.values()))  # the score of each fold so far
            if leader is not None and fold + 1 < n_folds and float(np.mean(accs)) < leader - PRUNE_MARGIN:
                return {
                    "status": "pruned",
                    "score": float(np.mean(accs)),
                    "folds": len(accs),
                    "error": f"stopped after {len(accs)} of {n_folds} folds: {np.mean(accs):.4f} is more than "
                    f"{PRUNE_MARGIN} below the leader's {leader:.4f}",
                    "seconds": time.perf_counter() - t0,
                    "cpu_seconds": time.process_time() - c0,
                    "pid": os.getpid(),
                }
    except Exception as e:  # noqa: BLE001 - one failing candidate must not end the search
        return _failed(e, t0)
    return _scored(scores, notes, t0, c0)
