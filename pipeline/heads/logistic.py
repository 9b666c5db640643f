"""The default head's solver: scikit-learn's multinomial logistic regression objective, minimized with
full-batch L-BFGS whose loss and gradient are float32 matrix products (``X @ W`` and ``X.T @ G``).

scikit-learn's lbfgs evaluates the same objective with a single-threaded per-row loss and stops only when
the largest gradient entry falls under ``tol`` — on a few hundred thousand standardized rows it runs to
its iteration cap (1,000) though the predictions stopped changing long before. Here each evaluation is
two BLAS products over the rows (threaded, float32: the features' own precision; the weights, the
objective and the L-BFGS state stay float64) and the fit stops when the objective stops moving
(it fell by less than :data:`PROGRESS` × ``tol``, relative, per iteration on average over the last
:data:`WINDOW`, where the test accuracy has long been flat) or its largest gradient entry is under ``tol``
(scikit-learn's own rule, with its default ``tol`` = 1e-4).
The rows come in blocks — views of the in-memory matrix, or chunks read from HDF5
(:meth:`BlasLogisticRegression.fit_chunks`) — so streaming gives the in-memory result to float rounding,
and no float64 copy of the features is ever made.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from sklearn.linear_model import LogisticRegression

#: rows go through X @ W and X.T @ G in blocks of about this size, so the second product finds the block in
#: cache: 800k × 1280 rows, 2 threads, one pass 0.86 s in 256-row blocks, 0.99 s in 32 MB
BLOCK_BYTES = 1 << 20
#: an in-memory fit's rows are cut into parts of about this size, each summed by one thread (BLAS on one
#: thread): its blocks' small products and softmax run side by side instead of one at a time on every
#: core. 800k × 1280 rows on 2 cores: one pass 0.76 s against 0.90 s. The cut does not depend on the
#: thread count and the parts are summed in order, so every machine takes the same steps.
PART_BYTES = 16 << 20
#: threads for the parts: those the BLAS may use here (a search worker's limit included), at most this many
MAX_THREADS = 8
#: a class whose logit is more than this below the row's largest gets probability 0 in the gradient
#: (e^-46 ≈ 1e-20; the loss keeps the exact value): tinier float32 probabilities make denormal products
#: in ``X.T @ G``, which ran up to 9× slower per pass late in a fit (54k × 1280 demo rows: 1.4 s against 0.16 s)
LOGIT_FLOOR = 46.0
#: the fit stops when the objective fell by less than this × ``tol`` (relative) per iteration: at the default
#: ``tol`` (1e-4), 5e-4. Measured test accuracy against 1e-4 per iteration, same rows: a 1M-row cache (800k
#: fit rows) 52 iterations against 86+, 0.7677 against 0.7685; the demo (54k) 123 against 217, 0.8899
#: against 0.8918 (benchmarks/notes/stage2.md)
PROGRESS = 5.0
WINDOW = 10  # stop when the objective fell, on average, by less than tol (relative) per iteration over these

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]]]


class BlasLogisticRegression(LogisticRegression):
    """:class:`~sklearn.linear_model.LogisticRegression` (same parameters, attributes, predictions and
    objective: ``C``, L2 on the weights, unpenalized intercept, ``class_weight``, ``sample_weight``)
    fitted by float32-BLAS L-BFGS with relative stopping (see the module). Settings it does not cover
    (another ``solver``, an L1 or elastic-net penalty, ``C = inf``, sparse input) use scikit-learn's fit."""

    def _covered(self, X) -> bool:
        import scipy.sparse as sp

        l1 = self.l1_ratio not in (0, 0.0, None)
        return (
            self.solver == "lbfgs"
            and self.penalty in ("deprecated", "l2")
            and not l1
            and np.isfinite(self.C)
            and not sp.issparse(X)
        )

    def fit(self, X, y, sample_weight=None):
        self._validate_params()  # C > 0, tol >= 0, ...: scikit-learn's own checks and messages
        if not self._covered(X):
            return super().fit(X, y, sample_weight=sample_weight)
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import _check_sample_weight, validate_data

        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], order="C")
        check_classification_targets(y)
        classes, yi = np.unique(y, return_inverse=True)
        sw = self._weights(classes, yi, sample_weight, X.dtype, len(y))
        if sample_weight is not None:
            sw = sw * _check_sample_weight(sample_weight, X, dtype=X.dtype)

        rows = max(256, PART_BYTES // max(X.shape[1] * X.itemsize, 1))

        def blocks():
            for i in range(0, len(X), rows):
                yield X[i : i + rows], yi[i : i + rows], None if sw is None else sw[i : i + rows]

        return self._solve(blocks, classes, X.shape[1], float(len(y) if sw is None else sw.sum()), X.dtype)

    def fit_chunks(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], y_all: np.ndarray):
        """The fit of :meth:`fit` on rows read in chunks (re-iterable ``(X, y)`` pairs, e.g. a
        :class:`~pipeline.cache.reader.ChunkSequence`), every pass over them one loss and gradient;
        ``y_all``: every row's label, for the classes and the class weights."""
        self._validate_params()
        if not self._covered(np.empty((0, 0))):
            raise ValueError(
                f"streaming fits solver='lbfgs' with an L2 penalty only (solver={self.solver!r},"
                f" l1_ratio={self.l1_ratio!r}, C={self.C!r}); set train.streaming = memory"
            )
        classes, yi_all = np.unique(y_all, return_inverse=True)
        cw = self._weights(classes, yi_all, None, np.float32, len(y_all), per_class=True)

        def blocks():
            for Xc, yc in chunks:
                yi = np.searchsorted(classes, yc)
                yield np.ascontiguousarray(Xc), yi, None if cw is None else cw[yi]

        first = next(iter(chunks))[0]
        n_features = first.shape[1]
        self.n_features_in_ = n_features
        sw_sum = float(len(y_all) if cw is None else cw[yi_all].sum())
        return self._solve(blocks, classes, n_features, sw_sum, first.dtype)

    def _weights(self, classes, yi, sample_weight, dtype, n, per_class=False):
        """``class_weight`` as scikit-learn applies it (one factor per class, ``balanced`` included):
        per row, or per class with ``per_class``; None when every row weighs 1."""
        if self.class_weight is None:
            return None if sample_weight is None else np.ones(n, dtype)
        from sklearn.utils.class_weight import compute_class_weight

        cw = compute_class_weight(self.class_weight, classes=classes, y=classes[yi]).astype(dtype)
        return cw if per_class else cw[yi]

    def _solve(self, blocks: Blocks, classes: np.ndarray, n_features: int, sw_sum: float, dtype):
        from scipy.optimize import minimize

        if len(classes) < 2:
            raise ValueError(
                "This solver needs samples of at least 2 classes in the data, but the data contains only"
                f" one class: {classes[0]!r}"
            )
        self.classes_ = classes
        k = 1 if len(classes) == 2 else len(classes)
        n_w = n_features * k
        w0 = np.zeros(n_w + (k if self.fit_intercept else 0))
        coef = getattr(self, "coef_", None) if self.warm_start else None
        if coef is not None and np.shape(coef) == (k, n_features):
            w0[:n_w] = np.asarray(coef, np.float64).T.ravel()
            if self.fit_intercept:
                w0[n_w:] = np.asarray(self.intercept_, np.float64)
        stop = ProgressStop(float(self.tol))
        l2 = 1.0 / (float(self.C) * sw_sum)
        with part_threads() as (pool, ahead):
            objective = Objective(blocks, n_features, k, l2, sw_sum, self.fit_intercept, pool, ahead)
            res = minimize(
                objective, w0, jac=True, method="L-BFGS-B", callback=stop,
                options={"maxiter": int(self.max_iter), "gtol": float(self.tol), "ftol": 0.0, "maxcor": 20, "maxls": 50},
            )  # fmt: skip
        w = res.x
        self.coef_ = w[:n_w].reshape(n_features, k).T.astype(dtype)
        self.intercept_ = (w[n_w:] if self.fit_intercept else np.zeros(k)).astype(dtype)
        self.n_iter_ = np.asarray([res.nit], np.int32)
        self.n_passes_ = objective.calls  # loss/gradient evaluations: passes over the rows
        self.converged_ = stop.stopped or bool(res.success)
        if not self.converged_:
            from sklearn.exceptions import ConvergenceWarning

            warnings.warn(
                f"logistic (L-BFGS, float32) did not converge in {res.nit} iterations: {res.message}",
                ConvergenceWarning,
                stacklevel=3,
            )
        return self


class Objective:
    """scikit-learn's lbfgs objective, normalized as it is: the weighted mean log loss plus
    ``l2 / 2 · |W|²`` with ``l2 = 1 / (C · Σ weights)``; intercepts unpenalized. ``k = 1``: the binary
    (sigmoid) form scikit-learn fits for two classes. Returns (value, gradient) for L-BFGS."""

    def __init__(
        self,
        blocks: Blocks,
        n_features: int,
        k: int,
        l2: float,
        sw_sum: float,
        fit_intercept: bool,
        pool: Executor | None = None,
        ahead: int = 1,
    ):
        self.blocks, self.d, self.k, self.l2, self.sw_sum = blocks, n_features, k, l2, sw_sum
        self.fit_intercept, self.pool = fit_intercept, pool
        self.ahead = ahead  # parts in flight on the pool's threads
        self.calls = 0

    def __call__(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        self.calls += 1
        n_w = self.d * self.k
        W = w[:n_w].reshape(self.d, self.k)
        b = w[n_w:] if self.fit_intercept else np.zeros(self.k)
        gW, gb, loss = np.zeros_like(W), np.zeros(self.k), 0.0
        cast: dict = {}  # dtype → (W, b) in the rows' precision, cast once per pass

        def part(block):
            X = block[0]
            if X.dtype not in cast:
                cast[X.dtype] = W.astype(X.dtype), b.astype(X.dtype)
            return self._part(block, *cast[X.dtype])

        for part_loss, part_gW, part_gb in ordered_map(self.pool, part, self.blocks(), self.ahead):
            loss, gW, gb = loss + part_loss, gW + part_gW, gb + part_gb  # in order: the same sum every run
        value = loss / self.sw_sum + 0.5 * self.l2 * float(np.sum(W * W))
        grad = np.concatenate(
            [(gW / self.sw_sum + self.l2 * W).ravel(), gb / self.sw_sum if self.fit_intercept else []]
        )
        return value, grad

    def _part(self, block, Wf: np.ndarray, bf: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """One part's loss and gradient sums, its rows through the products in cache-sized slices."""
        X_all, yi_all, sw_all = block
        rows = max(256, BLOCK_BYTES // max(X_all.shape[1] * X_all.itemsize, 1))
        gW, gb, loss = np.zeros((self.d, self.k)), np.zeros(self.k), 0.0
        for i in range(0, len(X_all), rows):
            X, yi = X_all[i : i + rows], yi_all[i : i + rows]
            Z = X @ Wf
            Z += bf
            block_loss, G = (_binary if self.k == 1 else _multinomial)(Z, yi)
            if sw_all is not None:
                sw = sw_all[i : i + rows]
                block_loss = block_loss * sw
                G *= sw[:, None]
            loss += float(np.sum(block_loss, dtype=np.float64))
            gW += X.T @ G
            gb += G.sum(axis=0, dtype=np.float64)
        return loss, gW, gb


@contextmanager
def part_threads() -> Iterator[tuple[Executor | None, int]]:
    """A pool of threads for the parts and how many may be in flight, with the BLAS on one thread while it
    lasts; no pool where the BLAS has one thread (a search worker on a busy machine)."""
    from threadpoolctl import threadpool_limits

    from pipeline.utils.workers import current_blas_threads

    threads = max(1, min(current_blas_threads(), MAX_THREADS))
    if threads == 1:
        yield None, 1
        return
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        yield pool, threads


def ordered_map(pool: Executor | None, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``fn`` of each item, in order; on ``pool``'s threads, at most ``ahead`` items in flight (streamed
    chunks stay bounded), or, without a pool, here."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _multinomial(Z: np.ndarray, yi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row softmax cross-entropy of logits ``Z`` (overwritten) and its gradient ``P − onehot(y)``."""
    r = np.arange(len(yi))
    Z -= Z.max(axis=1, keepdims=True)
    picked = Z[r, yi].copy()
    Z[Z < -LOGIT_FLOOR] = -np.inf  # exp gives 0, never a denormal
    np.exp(Z, out=Z)
    s = Z.sum(axis=1)
    Z /= s[:, None]
    Z[r, yi] -= 1.0
    return np.log(s) - picked, Z


def _binary(Z: np.ndarray, yi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row logistic loss of one logit column (class 1 = ``classes_[1]``) and its gradient ``p − y``."""
    z = Z[:, 0]
    y = yi.astype(Z.dtype)
    loss = np.logaddexp(0, z) - y * z
    G = Z
    G[:, 0] = 1.0 / (1.0 + np.exp(-np.clip(z, -LOGIT_FLOOR, LOGIT_FLOOR))) - y
    return loss, G


class ProgressStop:
    """An L-BFGS callback (scipy's ``minimize``) that ends the fit when the objective fell by less than
    :data:`PROGRESS` × ``tol`` (relative) per iteration over the last :data:`WINDOW` iterations: the
    predictions stopped changing long before the gradient reaches scikit-learn's ``tol``."""

    def __init__(self, tol: float, window: int = WINDOW):
        self.rtol, self.window, self.values, self.stopped = window * PROGRESS * tol, window, [], False

    def __call__(self, intermediate_result):
        f = float(intermediate_result.fun)
        self.values.append(f)
        if len(self.values) > self.window:
            old = self.values[-1 - self.window]
            if old - f <= self.rtol * max(abs(f), 1e-12):
                self.stopped = True
                raise StopIteration
