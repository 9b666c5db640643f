"""Many configurations of one head on the same prepared rows: regularization paths instead of repeated fits.

* ridge: every ``alpha`` from one eigendecomposition of the centred Gram matrix (``X^T X``, or ``X X^T``
  when there are fewer rows than features); each alpha then costs a matrix product. The solution is the
  one :class:`~sklearn.linear_model.RidgeClassifier` computes (targets in {-1, 1}, intercept by centring).
* logistic regression: consecutive values of ``C`` warm-start from the previous solution (the head's
  float32 L-BFGS, :mod:`pipeline.heads.logistic`, reaches the same optimum of the same convex objective,
  in fewer iterations).
* linear SVM: where ``C`` · mean |x|² is large, LinearSVC's problem solved with L-BFGS, each ``C`` starting
  from the previous one's weights; elsewhere liblinear's dual coordinate descent, which is quick there.
* k-nearest neighbours: the evaluated rows' nearest fit rows found once (:data:`KNN_PATH_K` of them); every
  ``n_neighbors`` then votes from the first columns, as :class:`~sklearn.neighbors.KNeighborsClassifier`
  does (a search's knn trials cost ~13 s each at 9,600 fit rows × 30,000 val rows, 1280-d; now the first).
  From :data:`~pipeline.index.neighbours.FAISS_KNN_FROM` distances on, FAISS's exact search finds them.

:func:`fit_predict_on_path` is the one entry: a search calls it for any head and keeps what it returns for
the next configuration on the same path, so no search code needs to know which heads have paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from pipeline.heads.logistic import ProgressStop

# LinearSVC parameters the squared-hinge solver below reproduces (the others: LinearSVC's own fit)
SVM_PARAMS = frozenset({"C", "tol", "max_iter", "intercept_scaling"})
LIBLINEAR_QUICK = 10.0  # C · mean |x|² up to which linear_svm keeps liblinear (dual)
KNN_PATH_K = 50  # neighbours a knn path finds at once (more when a configuration asks for more)


@dataclass(frozen=True)
class PathSpec:
    """How one head runs along a path: the parameter it varies, and one step of it.

    ``only``: the parameters a configuration may set and stay on the path (None: any); with others
    (solver, class_weight, loss, ...) it is the estimator's own fit. ``step(params, prep, X_eval, previous,
    seed)`` returns the predicted labels, the class probabilities when the head has them (columns: the
    sorted classes of ``prep.y``; None for a margin head) and what the next step may continue from (None:
    keep ``previous``).
    """

    param: str
    only: frozenset[str] | None
    step: Callable[..., tuple[np.ndarray, Any]]


def path_param(head: str, params: dict[str, Any]) -> str | None:
    """The parameter a path can vary for this configuration, or None (a plain fit)."""
    spec = PATHS.get(head)
    if spec is None:
        return None
    value = params.get(spec.param, 1.0)
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        return None
    if spec.only is not None and set(params) - spec.only:
        return None
    return spec.param


def path_value(head: str, params: dict[str, Any]) -> float:
    return float(params.get(PATHS[head].param, 1.0))


def path_group(head: str, params: dict[str, Any]) -> str | None:
    """What the configurations on one path share (the other parameters, canonical JSON); None: a plain fit."""
    name = path_param(head, params)
    if name is None:
        return None
    return json.dumps({k: v for k, v in params.items() if k != name}, sort_keys=True)


def fit_predict_on_path(
    head: str, params: dict[str, Any], prep, X_eval: np.ndarray, previous: Any, seed: int
) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """Fit ``head`` with ``params`` on prepared rows and predict ``X_eval``, continuing ``previous`` (what the
    last step on the same path returned, or None). Returns the predicted labels, the class probabilities
    (columns: ``np.unique(prep.y)``; None for a margin head: ridge, linear SVM) and what the next step on the
    path may continue from (None: nothing new). Scores as an independent fit would, within solver tolerance.
    """
    if path_param(head, params) is not None:
        return PATHS[head].step(params, prep, X_eval, previous, seed)
    return (*_plain_fit(head, params, prep, X_eval, seed), None)


def fit_scores_on_path(
    head: str, params: dict[str, Any], prep, X_eval: np.ndarray, previous: Any, seed: int
) -> tuple[np.ndarray, bool, Any, list[str]]:
    """:func:`fit_predict_on_path` on a multi-label cache (``prep.y`` multi-hot): N×C per-class scores of
    ``X_eval``, as :func:`pipeline.heads.multilabel.label_scores` gives them for the one-vs-rest fit
    (ridge along its one decomposition, logistic C warm-started class by class, the linear SVM's L-BFGS
    solving all classes at once), whether they are probabilities (False: sigmoid margins), what the next
    step may continue from, and the solver's warnings that
    :func:`~pipeline.heads.multilabel.fit_prepared_multilabel` recorded (the others are still raised)."""
    from pipeline.heads.multilabel import fit_prepared_multilabel, label_scores, multilabel_params

    params = multilabel_params(head, params)
    if path_param(head, params) is not None and head in MULTILABEL_STEPS:
        return MULTILABEL_STEPS[head](params, prep, X_eval, previous, seed)
    _, est, notes = fit_prepared_multilabel(head, params, prep, seed)
    return (*label_scores(est, X_eval), None, notes)


def _ridge_scores(params, prep, X_eval, previous, seed):
    from pipeline.heads.multilabel import margin_scores
    from pipeline.heads.registry import make_head

    make_head("ridge", params)
    path = previous if previous is not None else RidgePath(prep.X, prep.y, X_eval)
    return margin_scores(path.decision(float(params["alpha"]))), False, path, []


def _logistic_scores(params, prep, X_eval, previous, seed):
    """One binary logistic regression per class, as ``OneVsRestClassifier`` fits them, each warm-started."""
    from pipeline.heads.registry import make_head

    ests, P = [], np.zeros((len(X_eval), prep.y.shape[1]))
    for c in range(prep.y.shape[1]):
        if prep.y[:, c].min() == prep.y[:, c].max():  # constant here (a small subset): as one-vs-rest does
            P[:, c] = float(prep.y[0, c])
            ests.append(None)
            continue
        est = make_head("logistic", params, seed=seed, n_train=len(prep.y)).estimator
        warm_start_from(est, previous[c] if previous is not None else None)
        est.fit(prep.X, prep.y[:, c])
        P[:, c] = est.predict_proba(X_eval)[:, 1]
        ests.append(est)
    return P, True, ests, []


def _linear_svm_scores(params, prep, X_eval, previous, seed):
    from pipeline.heads.multilabel import fit_prepared_multilabel, label_scores, margin_scores
    from pipeline.heads.registry import make_head

    if liblinear_is_quick(path_value("linear_svm", params), prep.X):
        _, est, notes = fit_prepared_multilabel("linear_svm", params, prep, seed)
        return (*label_scores(est, X_eval), None, notes)
    make_head("linear_svm", params)
    svm = SquaredHingeSVM(**{k: v for k, v in params.items() if k in SVM_PARAMS})
    svm.fit(prep.X, prep.y, coef0=previous.W if previous is not None else None)
    return margin_scores(np.atleast_2d(svm.decision_function(X_eval).T).T), False, svm, []


def _plain_fit(name: str, params: dict[str, Any], prep, X_eval: np.ndarray, seed: int):
    from pipeline.heads.fitting import fit_prepared, predict_prepared
    from pipeline.heads.registry import make_head

    head = make_head(name, params, seed=seed, n_train=len(prep.y))
    if name == "linear_svm" and "dual" not in params:
        head.estimator.set_params(dual=True)  # paths reach here when C·|x|² is small: then it is quick
    fit_prepared(head, prep)
    return predict_prepared(head.estimator, X_eval)


def _ridge_step(params, prep, X_eval, previous, seed):
    from pipeline.heads.registry import make_head

    make_head("ridge", params)  # validates the configuration as a plain fit would
    path = previous if previous is not None else RidgePath(prep.X, prep.y, X_eval)
    return path.predict(float(params["alpha"])), None, path


def _logistic_step(params, prep, X_eval, previous, seed):
    from pipeline.heads.fitting import fit_prepared, predict_prepared
    from pipeline.heads.registry import make_head

    head = make_head("logistic", params, seed=seed, n_train=len(prep.y))
    warm_start_from(head.estimator, previous)
    fit_prepared(head, prep)
    return (*predict_prepared(head.estimator, X_eval), head.estimator)


def _linear_svm_step(params, prep, X_eval, previous, seed):
    from pipeline.heads.registry import make_head

    if liblinear_is_quick(path_value("linear_svm", params), prep.X):
        return (*_plain_fit("linear_svm", params, prep, X_eval, seed), None)
    make_head("linear_svm", params)  # validates the configuration as a plain fit would
    svm = SquaredHingeSVM(**{k: v for k, v in params.items() if k in SVM_PARAMS})
    svm.fit(prep.X, prep.y, coef0=previous.W if previous is not None else None)
    return svm.predict(X_eval), None, svm


def _knn_step(params, prep, X_eval, previous, seed):
    from pipeline.heads.registry import make_head

    est = make_head("knn", params).estimator  # validates the configuration as a plain fit would
    if est.weights not in ("uniform", "distance") or est.n_neighbors > len(prep.y):
        return (*_plain_fit("knn", params, prep, X_eval, seed), None)
    path = previous if previous is not None and previous.k >= est.n_neighbors else None
    path = path or KnnPath(prep.X, prep.y, X_eval, max(est.n_neighbors, KNN_PATH_K))
    return (*path.predict(est.n_neighbors, est.weights), path)


class KnnPath:
    """The ``k`` nearest fit rows of each evaluated row, found once by scikit-learn's own neighbour search;
    :meth:`predict` votes as :class:`~sklearn.neighbors.KNeighborsClassifier` with any smaller ``n``."""

    def __init__(self, X: np.ndarray, y: np.ndarray, X_eval: np.ndarray, k: int):
        from sklearn.neighbors import KNeighborsClassifier

        from pipeline.index.neighbours import FAISS_KNN_FROM, euclidean_topk
        from pipeline.utils.workers import current_blas_threads

        self.k = min(int(k), len(y))
        self.classes, self.y = np.unique(y, return_inverse=True)
        if len(X) * len(X_eval) >= FAISS_KNN_FROM:  # a search's last rungs: FAISS's exact search, faster
            self.dist, self.ind = euclidean_topk(X_eval, X, self.k, current_blas_threads())
        else:
            self.dist, self.ind = KNeighborsClassifier(self.k).fit(X, y).kneighbors(X_eval)

    def predict(self, n: int, weights: str) -> tuple[np.ndarray, np.ndarray]:
        """Labels and class probabilities (columns: the sorted classes) from the ``n`` nearest."""
        votes = self.y[self.ind[:, :n]]
        if weights == "distance":  # 1/d; rows with a neighbour at distance 0 count only those
            with np.errstate(divide="ignore"):
                w = 1.0 / self.dist[:, :n]
            exact = np.isinf(w)
            hit = exact.any(axis=1)
            w[hit] = exact[hit]
        else:
            w = np.ones(votes.shape)
        proba = np.zeros((len(votes), len(self.classes)))
        np.add.at(proba, (np.arange(len(votes))[:, None], votes), w)
        total = proba.sum(axis=1, keepdims=True)
        proba /= np.where(total == 0, 1.0, total)
        return self.classes[np.argmax(proba, axis=1)], proba


class RidgePath:
    """Ridge classifiers for any alpha on fixed (X, y), scored on fixed ``X_eval``, from one decomposition."""

    def __init__(self, X: np.ndarray, y: np.ndarray, X_eval: np.ndarray):
        from sklearn.preprocessing import LabelBinarizer

        if np.ndim(y) == 2:  # a multi-hot matrix: each column one-vs-rest, as RidgeClassifier per class
            Y, self.classes = 2.0 * np.asarray(y, np.float64) - 1.0, np.arange(np.shape(y)[1])
        else:
            lb = LabelBinarizer(pos_label=1, neg_label=-1)
            Y = lb.fit_transform(y).astype(np.float64)
            self.classes = lb.classes_
        X = np.asarray(X, np.float64)
        x_mean, self.y_mean = X.mean(axis=0), Y.mean(axis=0)
        Xc, Yc = X - x_mean, Y - self.y_mean
        Ec = np.asarray(X_eval, np.float64) - x_mean
        if Xc.shape[0] >= Xc.shape[1]:  # primal: (Xc^T Xc + a I) w = Xc^T Yc
            lam, V = np.linalg.eigh(Xc.T @ Xc)
            self.P, self.B = Ec @ V, V.T @ (Xc.T @ Yc)
        else:  # dual: w = Xc^T (Xc Xc^T + a I)^-1 Yc
            lam, U = np.linalg.eigh(Xc @ Xc.T)
            self.P, self.B = (Ec @ Xc.T) @ U, U.T @ Yc
        self.lam = np.clip(lam, 0.0, None)

    def decision(self, alpha: float) -> np.ndarray:
        return self.P @ (self.B / (self.lam + alpha)[:, None]) + self.y_mean

    def predict(self, alpha: float) -> np.ndarray:
        d = self.decision(alpha)
        if d.shape[1] == 1:
            return self.classes[(d[:, 0] > 0).astype(int)]
        return self.classes[np.argmax(d, axis=1)]


def warm_start_from(estimator, previous) -> None:
    """Start ``estimator`` (unfitted, same head and data) from ``previous``'s solution."""
    if previous is None or getattr(previous, "coef_", None) is None:
        return
    estimator.set_params(warm_start=True)
    estimator.coef_ = np.array(previous.coef_, copy=True)
    estimator.intercept_ = np.array(previous.intercept_, copy=True)


def liblinear_is_quick(C: float, X: np.ndarray) -> bool:
    """liblinear's dual coordinate descent converges fast when C · mean |x|² is small (unit-norm rows,
    small C); otherwise (standardized features: |x|² ≈ the feature count) it can take minutes."""
    return C * float(np.mean(np.einsum("ij,ij->i", X, X))) <= LIBLINEAR_QUICK


class SquaredHingeSVM:
    """LinearSVC's default problem (L2-regularized squared hinge, one-vs-rest, regularized bias column of
    ``intercept_scaling``) solved in the primal with L-BFGS for all classes at once.

    liblinear's coordinate descent and trust-region solvers can need minutes on standardized features
    (thousands of iterations when the rows are correlated); L-BFGS on the same smooth objective costs two
    matrix products per step. ``fit`` starts from ``coef0`` (a warm start along a path of C).
    """

    def __init__(
        self, C: float = 1.0, tol: float = 1e-4, max_iter: int = 1000, intercept_scaling: float = 1.0
    ):
        self.C, self.tol, self.max_iter, self.scaling = (
            float(C),
            float(tol),
            int(max_iter),
            float(intercept_scaling),
        )
        self.W: np.ndarray | None = None
        self.converged = True

    def fit(self, X: np.ndarray, y: np.ndarray, coef0: np.ndarray | None = None) -> SquaredHingeSVM:
        from scipy.optimize import minimize

        if np.ndim(y) == 2:  # a multi-hot matrix: one binary problem per column, as one-vs-rest
            self.classes_ = np.arange(np.shape(y)[1])
            Y = (2.0 * np.asarray(y, np.float32) - 1.0).astype(np.float32)
        else:
            self.classes_ = np.unique(y)
            if len(self.classes_) < 2:
                raise ValueError("needs samples of at least two classes")
            cols = self.classes_[1:] if len(self.classes_) == 2 else self.classes_
            Y = np.where(np.asarray(y)[:, None] == cols[None, :], 1.0, -1.0).astype(np.float32)
        # The two matrix products of a step in float32 (the features' own precision; ~1.5× faster), the
        # weights, the objective and the gradient's sum with W in float64 for L-BFGS. The bias column of
        # ``intercept_scaling`` is added to the products, never to a copy of X.
        X = np.asarray(X, np.float32)
        C, s, d = self.C, np.float32(self.scaling), X.shape[1] + 1

        def f(w):
            W = w.reshape(d, Y.shape[1])
            Wf = W.astype(np.float32)
            m = np.maximum(0.0, 1.0 - Y * (X @ Wf[:-1] + s * Wf[-1]))
            Ym = Y * m
            grad = W - 2.0 * C * np.vstack([X.T @ Ym, s * Ym.sum(axis=0, keepdims=True)]).astype(np.float64)
            loss = 0.5 * float(np.sum(W * W)) + C * float(np.sum(np.square(m, dtype=np.float64)))
            return loss, grad.ravel()

        w0 = np.zeros(d * Y.shape[1]) if coef0 is None else np.asarray(coef0, np.float64).ravel()
        g0 = np.abs(f(np.zeros_like(w0))[1]).max()
        stop = ProgressStop(self.tol)  # large C on standardized rows: hundreds of iterations of a flat tail
        res = minimize(
            f, w0, jac=True, method="L-BFGS-B", callback=stop,
            options={"maxiter": self.max_iter, "gtol": self.tol * g0, "ftol": 1e-12, "maxcor": 20},
        )  # fmt: skip
        self.W, self.converged, self.n_iter_ = (
            res.x.reshape(d, Y.shape[1]),
            stop.stopped or bool(res.success),
            res.nit,
        )
        if not self.converged:
            import warnings

            from sklearn.exceptions import ConvergenceWarning

            warnings.warn(
                f"linear_svm (L-BFGS) did not converge in {self.n_iter_} iterations: {res.message}",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        d = np.asarray(X, np.float64) @ self.W[:-1] + self.scaling * self.W[-1]
        return d[:, 0] if d.shape[1] == 1 else d

    def predict(self, X: np.ndarray) -> np.ndarray:
        d = self.decision_function(X)
        return self.classes_[(d > 0).astype(int)] if d.ndim == 1 else self.classes_[np.argmax(d, axis=1)]


#: the multi-label step of each head with a path (same parameters and ``only`` as :data:`PATHS`)
MULTILABEL_STEPS = {"ridge": _ridge_scores, "logistic": _logistic_scores, "linear_svm": _linear_svm_scores}

PATHS: dict[str, PathSpec] = {
    "ridge": PathSpec("alpha", frozenset({"alpha"}), _ridge_step),
    "logistic": PathSpec("C", None, _logistic_step),
    "linear_svm": PathSpec("C", SVM_PARAMS, _linear_svm_step),
    "knn": PathSpec("n_neighbors", frozenset({"n_neighbors", "weights"}), _knn_step),
}
