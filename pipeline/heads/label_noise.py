"""Likely label errors: out-of-fold probabilities from a linear head, ranked by confident learning.

Confident learning is the method of Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty
in Dataset Labels", JAIR 70 (2021), as implemented by cleanlab's ``find_label_issues``. It is implemented here (about sixty lines of NumPy)
rather than imported, because cleanlab would pull pandas and its other requirements into the core
dependencies for one function:

1. per-class thresholds ``t_j`` = the mean predicted probability of class ``j`` over the rows labelled ``j``;
2. the confident joint ``C[i, j]``: rows labelled ``i`` whose probability reaches ``t_j`` for some class,
   counted under the most probable such class ``j``; calibrated so that row ``i`` sums to the number of
   rows labelled ``i`` and the whole matrix to ``n``;
3. the issues, by one of two of cleanlab's filters:

   - ``low_self_confidence`` (the default): the number of label errors is estimated as the off-diagonal
     mass of the calibrated confident joint, and that many rows with the lowest self-confidence
     ``p[given]`` are the issues;
   - ``prune_by_noise_rate``: for every off-diagonal cell, the ``round(C[i, j])`` rows labelled ``i`` with
     the largest margin ``p_j - p_i`` are issues (never leaving a class with fewer than one row);

   either way a row whose most probable class is its given label is not an issue;
4. issues are ranked by self-confidence ``p[given]``, lowest first.

On the Fashion-MNIST benchmark (3,000 images, 60 labels flipped at random; ``benchmarks/bench_audit.py``)
``prune_by_noise_rate`` put 75–80 % of the flips in the top 120 and ``low_self_confidence`` 88–92 %:
pruning per cell loses the flips that land in a cell of many natural confusions (shirt ↔ T-shirt).

**Multi-label** (a multi-hot matrix): cleanlab's one-vs-rest reduction
(``cleanlab.multilabel_classification.filter.find_multilabel_issues_per_class``). Each class is its own
binary problem, absent vs present, with out-of-fold probabilities ``(1 - p, p)`` from one binary logistic
regression per class (:func:`out_of_fold_multilabel_proba`), and the confident learning above runs on it
unchanged (:func:`find_multilabel_issues`). A flagged cell is a suspect label: *extra* when the class is
labelled present, *missing* when it is not; an image is flagged when any of its cells is. The flagged cells
match cleanlab's on the same probabilities (``tests/test_multilabel_audit_report.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.utils.config import LABEL_FILTERS
from pipeline.utils.errors import FeatcacheError


@dataclass
class LabelIssues:
    """Rows flagged by confident learning, most suspicious first."""

    rows: np.ndarray  # positions into the arrays given to ``find_label_issues``
    given: np.ndarray
    suggested: np.ndarray
    score: np.ndarray  # 1 - p(given label): higher = more likely mislabelled


#: rows of the features read at a time when the rows outside the fit sample are scored
SCORE_BLOCK = 65_536


def out_of_fold_proba(
    X,
    y: np.ndarray,
    fit_mask: np.ndarray,
    n_classes: int,
    *,
    folds: int = 5,
    alpha: float = 0.125,
    seed: int = 0,
    n_jobs: int = 1,
    fit_rows: int = 0,
) -> np.ndarray:
    """Probabilities for every row, none from a model that saw that row.

    Rows in ``fit_mask`` (train + val) get out-of-fold predictions from a stratified k-fold of
    standardize + logistic regression, with ``C = 1 / (alpha · n_fit)`` so that the penalty per row stays
    the same whatever the size of the dataset; the other rows (test) get the mean of the k fold models, none of
    which was fitted on them.

    ``fit_rows`` (0: all): with more train + val rows than this, the folds split a random per-class sample of
    that many (:func:`fit_sample`) and the train + val rows outside it are scored like test rows, so the
    cost of the fits stays that of ``fit_rows`` rows whatever the cache's size. ``X``: an N×D array, or a
    function ``rows → features`` (a cache's rows, read :data:`SCORE_BLOCK` rows at a time, never all).
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    all_fit = np.flatnonzero(fit_mask)
    counts = np.bincount(y[all_fit], minlength=n_classes)
    if len(all_fit) < 4 or (counts > 0).sum() < 2:
        raise FeatcacheError(
            f"audit needs at least 4 train+val rows in 2 classes, the cache has {len(all_fit)} "
            f"in {(counts > 0).sum()}"
        )
    k = max(2, min(int(folds), len(all_fit)))
    sample = fit_sample(all_fit, y, fit_rows, 2 * k, seed)
    counts = np.bincount(y[sample], minlength=n_classes)
    smallest = int(counts[counts > 0].min())
    if smallest >= 2:  # stratified: every fold model sees every class
        splitter = StratifiedKFold(n_splits=min(k, smallest), shuffle=True, random_state=seed)
    else:  # a class with one row cannot be in two folds
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    splits = list(splitter.split(sample, y[sample]))
    fit = lambda Xs, tr: _fit_fold(Xs[tr], y[sample[tr]], n_classes, 1.0 / (alpha * len(tr)), seed)  # noqa: E731
    return _cross_fit(X, len(y), sample, splits, fit, n_classes, n_jobs)


def fit_sample(rows: np.ndarray, y: np.ndarray | None, size: int, floor: int, seed: int) -> np.ndarray:
    """``rows`` when ``size`` is 0 or not smaller; else about ``size`` of them at random, sorted, each class
    of ``y`` (None: no classes) in its share but at least ``floor`` rows (or all it has), so every fold
    model still sees every class."""
    if size <= 0 or len(rows) <= size:
        return rows
    rng = np.random.default_rng(seed)
    if y is None:
        return np.sort(rng.choice(rows, size, replace=False))
    by_class = rows[np.argsort(y[rows], kind="stable")]
    counts = np.bincount(y[rows])
    take = []
    for members in np.split(by_class, np.cumsum(counts)[:-1]):
        m = min(len(members), max(round(len(members) * size / len(rows)), floor))
        if m:
            take.append(rng.choice(members, m, replace=False))
    return np.sort(np.concatenate(take))


def _cross_fit(X, n: int, sample: np.ndarray, splits, fit, width: int, n_jobs: int) -> np.ndarray:
    """Fold models fitted on ``sample``'s folds (``fit(sample features, train positions)``); each sample
    row scored by the model that left it out, every other row by the mean of the models, in blocks."""
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    read = X if callable(X) else (lambda rows: X[rows])
    Xs = read(sample)
    models = Parallel(n_jobs=n_jobs)(delayed(fit)(Xs, tr) for tr, _ in splits)
    proba = np.zeros((n, width), np.float64)
    for (_, te), model in zip(splits, models, strict=True):
        proba[sample[te]] = model(Xs[te])
    del Xs
    outside = np.ones(n, bool)
    outside[sample] = False
    other = np.flatnonzero(outside)
    # one BLAS thread, as the fits: small products on busy cores
    with threadpool_limits(limits=1, user_api="blas"):
        for start in range(0, len(other), SCORE_BLOCK):
            rows = other[start : start + SCORE_BLOCK]
            block = read(rows)
            proba[rows] = sum(model(block) for model in models) / len(models)
    return proba


@dataclass
class _FoldModel:
    """One fold's fitted pipeline; called on features, it gives one column per class of the cache."""

    model: object
    cols: np.ndarray  # the classes it saw (a class absent from the fold's rows has no column)
    n_classes: int

    def __call__(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros((len(X), self.n_classes))
        if len(X):
            out[:, self.cols] = self.model.predict_proba(X)
        return out


def _fit_fold(X, y, n_classes: int, C: float, seed: int) -> _FoldModel:
    from sklearn.pipeline import Pipeline
    from threadpoolctl import threadpool_limits

    from pipeline.heads.registry import make_head
    from pipeline.heads.transforms import build_transforms

    head = make_head("logistic", {"C": C, "max_iter": 300}, seed=seed).estimator
    model = Pipeline([*build_transforms(["standardize"]), ("head", head)])
    # one BLAS thread: these products are small, and a threaded BLAS on busy cores spins (measured 16×
    # slower on 2 shared cores); parallelism, when wanted, is across folds (``n_jobs``)
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(X, y)
    return _FoldModel(model, np.asarray(model.classes_, dtype=int), n_classes)


def confident_guess(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows confidently counted, the class each is counted under): step 1–2 before calibration."""
    k = proba.shape[1]
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array(
        [proba[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)], dtype=np.float64
    )
    above = proba >= thresholds - 1e-6
    return above.any(axis=1), np.where(above, proba, -np.inf).argmax(axis=1)


def confident_joint(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """The calibrated confident joint ``C[given, true]`` (step 1–2 of the module docstring)."""
    n, k = proba.shape
    counts = np.bincount(labels, minlength=k)
    confident, true_guess = confident_guess(labels, proba)
    joint = np.zeros((k, k), np.float64)
    np.add.at(joint, (labels[confident], true_guess[confident]), 1.0)
    rows = joint.sum(axis=1, keepdims=True)
    joint = np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0) * counts[:, None]
    total = joint.sum()
    return joint * (n / total) if total else joint


def find_label_issues(
    labels: np.ndarray,
    proba: np.ndarray,
    filter_by: str = "low_self_confidence",
    *,
    count: str = "calibrated",
) -> LabelIssues:
    """Confident learning's issues (step 3 of the module docstring), ranked by self-confidence, lowest first.

    ``count`` is how ``low_self_confidence`` estimates the number of errors: ``calibrated``, the off-diagonal
    mass of the calibrated joint; ``off_diagonal``, cleanlab's default (``count.num_label_issues``): the rows
    confidently counted under another class that the model does not predict as given."""
    if filter_by not in LABEL_FILTERS:
        raise FeatcacheError(
            f"label issues: filter_by must be one of {', '.join(LABEL_FILTERS)}, got {filter_by!r}"
        )
    labels = np.asarray(labels, dtype=int)
    n, k = proba.shape
    joint = confident_joint(labels, proba)
    self_conf = proba[np.arange(n), labels]
    suggested = proba.argmax(axis=1)
    if filter_by == "low_self_confidence":
        if count == "off_diagonal":
            confident, guess = confident_guess(labels, proba)
            off = confident & (guess != labels)
            n_issues = int((off & (np.argmax(proba + 1e-6 * np.eye(k)[labels], axis=1) != labels)).sum())
        else:
            n_issues = int(np.rint(joint.sum() - np.trace(joint)))
        issue = np.zeros(n, bool)
        issue[np.argsort(self_conf, kind="stable")[:n_issues]] = True
    else:
        issue = _prune_by_noise_rate(labels, proba, joint)
    issue &= suggested != labels
    rows = np.flatnonzero(issue)
    rows = rows[np.argsort(self_conf[rows], kind="stable")]
    return LabelIssues(rows, labels[rows], suggested[rows], 1.0 - self_conf[rows])


def _prune_by_noise_rate(labels: np.ndarray, proba: np.ndarray, joint: np.ndarray) -> np.ndarray:
    n, k = proba.shape
    counts = np.bincount(labels, minlength=k)
    prune = np.rint(joint).astype(int)
    np.fill_diagonal(prune, 0)
    issue = np.zeros(n, bool)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        budget = max(int(counts[i]) - 1, 0)  # keep at least one row per class
        for j in np.argsort(-prune[i]):
            m = min(int(prune[i, j]), budget)
            if j == i or m <= 0:
                continue
            margin = proba[members, j] - proba[members, i]
            issue[members[np.argsort(-margin, kind="stable")[:m]]] = True
            budget -= m
    return issue


# -- multi-label: one binary confident-learning problem per class ----------------------------------------


@dataclass
class LabelIssuesPerClass:
    """(row, class) cells of a multi-hot matrix flagged by per-class confident learning, most suspicious first."""

    rows: np.ndarray  # positions into the arrays given to ``find_multilabel_issues``
    classes: np.ndarray
    given: np.ndarray  # 1: the class is labelled present (suspect: extra), 0: absent (suspect: missing)
    proba: np.ndarray  # the out-of-fold probability of the class
    score: np.ndarray  # 1 - p(given state): higher = more likely wrong


def out_of_fold_multilabel_proba(
    X,
    Y: np.ndarray,
    fit_mask: np.ndarray,
    *,
    folds: int = 5,
    alpha: float = 0.125,
    seed: int = 0,
    n_jobs: int = 1,
    fit_rows: int = 0,
) -> np.ndarray:
    """N×C one-vs-rest probabilities, none from a model that saw the row: :func:`out_of_fold_proba`'s protocol
    (k folds over train + val, or a random sample of ``fit_rows`` of them; the other rows scored by the mean
    of the fold models) with one binary standardize + logistic regression per class; a class absent (or
    present everywhere) in a fold's training rows gets that fold's constant rate."""
    from sklearn.model_selection import KFold

    Y = np.asarray(Y, dtype=np.uint8)
    all_fit = np.flatnonzero(fit_mask)
    if len(all_fit) < 4:
        raise FeatcacheError(f"audit needs at least 4 train+val rows, the cache has {len(all_fit)}")
    k = max(2, min(int(folds), len(all_fit)))
    sample = fit_sample(all_fit, None, fit_rows, 0, seed)
    splits = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(sample))
    fit = lambda Xs, tr: _fit_fold_ovr(Xs[tr], Y[sample[tr]], 1.0 / (alpha * len(tr)), seed)  # noqa: E731
    return _cross_fit(X, len(Y), sample, splits, fit, Y.shape[1], n_jobs)


#: standardized values are clipped to ±Z_CLIP for the per-class probes: a channel nearly constant in a fold's
#: training rows (common at small image sizes) otherwise standardizes to |z| > 100 on one image and makes
#: its probabilities 0.00/1.00 for every class — confident, wrong, and flagged first
Z_CLIP = 5.0


def _clipped(scaler, X: np.ndarray) -> np.ndarray:
    return np.clip(scaler.transform(X), -Z_CLIP, Z_CLIP)


@dataclass
class _FoldModelOVR:
    """One fold's scaler and per-class heads (a float: the class's constant rate in the fold)."""

    scaler: object
    heads: list

    def __call__(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros((len(X), len(self.heads)))
        if not len(X):
            return out
        Xc = _clipped(self.scaler, X)
        for c, head in enumerate(self.heads):
            out[:, c] = head if isinstance(head, float) else head.predict_proba(Xc)[:, 1]
        return out


def _fit_fold_ovr(X, Y, C: float, seed: int) -> _FoldModelOVR:
    from threadpoolctl import threadpool_limits

    from pipeline.heads.registry import make_head
    from pipeline.heads.transforms import build_transforms

    heads: list = []
    with threadpool_limits(limits=1, user_api="blas"):  # as in _fit_fold: small products, busy cores
        scaler = build_transforms(["standardize"])[0][1].fit(X)
        Xt = _clipped(scaler, X)
        for c in range(Y.shape[1]):
            y = Y[:, c]
            if y.min() == y.max():  # nothing to separate in this fold
                heads.append(float(y[0]) if len(y) else 0.0)
                continue
            heads.append(make_head("logistic", {"C": C, "max_iter": 300}, seed=seed).estimator.fit(Xt, y))
    return _FoldModelOVR(scaler, heads)


def find_multilabel_issues(
    Y: np.ndarray, proba: np.ndarray, filter_by: str = "low_self_confidence"
) -> LabelIssuesPerClass:
    """Per class, :func:`find_label_issues` on the binary problem (absent, present) with probabilities
    ``(1 - p, p)``: cleanlab's ``multilabel_classification.filter.find_multilabel_issues_per_class``, whose
    any-class union is its ``find_label_issues``. Ranked by ``1 - p(given state)``, highest first."""
    Y = np.asarray(Y, dtype=int)
    rows, classes = [], []
    for c in range(Y.shape[1]):
        y = Y[:, c]
        if y.min() == y.max():  # one state only: confident learning has nothing to compare it with
            continue
        binary = np.stack([1.0 - proba[:, c], proba[:, c]], axis=1)
        found = find_label_issues(y, binary, filter_by, count="off_diagonal")
        rows.append(found.rows)
        classes.append(np.full(len(found.rows), c))
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(classes) if classes else np.zeros(0, int)
    given = Y[r, c] if len(r) else np.zeros(0, int)
    p = proba[r, c] if len(r) else np.zeros(0)
    score = np.where(given == 1, 1.0 - p, p)
    order = np.lexsort((c, r, -score))
    return LabelIssuesPerClass(r[order], c[order], given[order], p[order], score[order])
