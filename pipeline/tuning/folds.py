"""The rows every trial fits and is scored on: the val split, or k folds of train+val; never test rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.utils.errors import FeatcacheError


@dataclass
class Plan:
    """How every trial is scored: (fit rows, scoring rows, early-stopping rows) per fold; test rows absent."""

    folds: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    rank: np.ndarray  # a fixed random rank per cache row: halving's subsets are nested prefixes
    n_classes: int
    multilabel: bool = False  # multi-hot labels: trials are scored by macro mAP, not accuracy
    # what a head is fitted with beyond its candidate's params, by head (a text head's class embeddings)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fit_params(self, head: str, params: dict[str, Any]) -> dict[str, Any]:
        """A candidate's params with its head's extras (:func:`add_extras`)."""
        return {**params, **self.extras.get(head, {})}

    @property
    def n_eval(self) -> int:
        """The rows a trial is scored on, all folds together."""
        return int(sum(len(f[1]) for f in self.folds))

    @property
    def resolution(self) -> float:
        """The smallest score difference the scored rows can resolve: 1/n for an accuracy on n rows (a
        difference under it is a tie); a macro mAP has no such step (only equal scores tie)."""
        return self.resolution_at(1.0)

    def resolution_at(self, fraction: float) -> float:
        """:attr:`resolution` of a halving rung on ``fraction`` of the fit rows (scored on
        :meth:`scored_rows`)."""
        n = sum(len(eval_subset(f[1], self.rank, fraction)) for f in self.folds)
        return 0.0 if self.multilabel else 1.0 / max(n, 1)

    def scored_rows(self, fold: int, fraction: float) -> tuple[np.ndarray, np.ndarray | None]:
        """A fold's scoring and early-stopping rows on a rung that fits ``fraction`` of its fit rows
        (:func:`eval_subset`)."""
        _, eval_rows, es_rows = self.folds[fold]
        if es_rows is not None:
            es_rows = eval_subset(es_rows, self.rank, fraction)
        return eval_subset(eval_rows, self.rank, fraction), es_rows


def subset_rows(rows: np.ndarray, rank: np.ndarray, fraction: float) -> np.ndarray:
    """The first ``fraction`` of ``rows`` by ``rank``: a smaller fraction is a prefix of a larger one."""
    if fraction >= 1.0:
        return rows
    keep = subset_size(len(rows), fraction)
    return np.sort(rows[np.argsort(rank[rows], kind="stable")[:keep]])


#: a halving rung scores on the same share of the scoring rows as of the fit rows, but at least this many
#: (accuracy's standard error about 0.4 point): at 1M rows the first rung's 100 candidates fitted 9.9k rows
#: and each scored 100k val rows; the last rung scores every row
EVAL_FLOOR = 10_000


def eval_subset(rows: np.ndarray, rank: np.ndarray, fraction: float) -> np.ndarray:
    """The scoring (or early-stopping) rows of a rung on ``fraction`` of the fit rows: that fraction of
    ``rows`` and at least :data:`EVAL_FLOOR`, nested like :func:`subset_rows`."""
    if fraction >= 1.0 or len(rows) <= EVAL_FLOOR:
        return rows
    return subset_rows(rows, rank, max(fraction, EVAL_FLOOR / len(rows)))


def subset_size(n: int, fraction: float) -> int:
    """How many of ``n`` rows :func:`subset_rows` keeps for ``fraction``."""
    return n if fraction >= 1.0 else max(1, int(math.ceil(n * fraction)))


def plan_folds(cache, cv: int, seed: int) -> tuple[Plan, np.ndarray, list[str]]:
    """The plan for ``cv`` folds (0: train against val), the rows it loads, and notes on how it was split."""
    notes = []
    train_rows, val_rows = cache.rows("train"), cache.rows("val")
    if len(train_rows) == 0:
        raise FeatcacheError("no training rows: the cache's train split is empty")
    rank = np.random.default_rng(seed).permutation(cache.n_rows)
    n_classes, multilabel = len(cache.class_names), bool(cache.multilabel)
    if cv == 0:
        if len(val_rows) == 0:
            raise FeatcacheError(
                "the val split is empty: set data.val_fraction > 0 and re-extract, or search with --cv K"
            )
        return (
            Plan([(train_rows, val_rows, val_rows)], rank, n_classes, multilabel),
            np.concatenate([train_rows, val_rows]),
            notes,
        )
    from sklearn.model_selection import KFold, StratifiedKFold

    pool = np.sort(np.concatenate([train_rows, val_rows]))
    if multilabel:  # stratifying needs one label a row: plain k-fold, shuffled
        notes.append("multi-label: plain (unstratified) k-fold; folds are shuffled rows")
        folds = [(pool[a], pool[b], None) for a, b in KFold(cv, shuffle=True, random_state=seed).split(pool)]
        return Plan(folds, rank, n_classes, True), pool, notes
    y = cache.labels[pool]
    counts = np.bincount(y)
    splitter = StratifiedKFold(cv, shuffle=True, random_state=seed)
    if counts[counts > 0].min() < cv:
        splitter = KFold(cv, shuffle=True, random_state=seed)
        notes.append(f"a class has fewer than {cv} samples: plain (unstratified) k-fold")
    folds = [
        (pool[a], pool[b], None) for a, b in splitter.split(pool, y)
    ]  # early stopping stays inside fit rows
    return Plan(folds, rank, n_classes), pool, notes


def add_extras(plan: Plan, cfg, cache, heads) -> str:
    """Hand ``plan`` the fit parameters ``heads`` take beyond their candidates' (a text head's class
    embeddings, :func:`pipeline.heads.zeroshot.fit_extras`, as ``train`` does) and return a digest of them
    ("" when none): what the trials are keyed by besides the rows."""
    from pipeline.heads.zeroshot import extras_digest, fit_extras

    infos = []
    for head in sorted(set(heads)):
        params, info = fit_extras(cfg, cache, head)
        if params:
            plan.extras[head] = params
            infos.append(info)
    return extras_digest(infos) if infos else ""
