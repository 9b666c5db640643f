"""The logistic head's float32 L-BFGS solver against scikit-learn's lbfgs, on real cached features.

The features are the shared digits cache of ``test_train.py`` (1280-d EfficientNet-Lite0 features of real
images): the solver must reach scikit-learn's optimum of the same objective, continue from a warm start in
fewer iterations, give the same fit when the rows are streamed from HDF5 in chunks, and survive a run
folder's save and load.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def digits(digits_cache):
    """Standardized train and test features of the digits cache, float32 as the cache holds them."""
    from sklearn.preprocessing import StandardScaler

    from pipeline.cache.store import FeatureCache

    with FeatureCache(digits_cache) as c:
        tr, te = c.rows("train"), c.rows("test")
        Xtr, Xte, ytr, yte = c.features(None, tr), c.features(None, te), c.labels[tr], c.labels[te]
    scaler = StandardScaler().fit(Xtr)
    return scaler.transform(Xtr), ytr, scaler.transform(Xte), yte


def _objective(est, X, y, sample_weight=None):
    """scikit-learn's lbfgs objective at ``est``'s solution, in float64: C·Σ w·loss + |W|²/2."""
    from sklearn.metrics import log_loss

    w = np.ones(len(y)) if sample_weight is None else sample_weight
    P = est.predict_proba(np.asarray(X, np.float64))
    return est.C * log_loss(y, P, sample_weight=w, normalize=False) + 0.5 * float(
        np.sum(np.asarray(est.coef_, np.float64) ** 2)
    )


@pytest.mark.parametrize("binary", [False, True])
def test_same_objective_same_optimum_as_scikit_learn(digits, binary):
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads.logistic import BlasLogisticRegression

    X, y, Xte, yte = digits
    if binary:  # two classes: scikit-learn's one-column (sigmoid) form
        y, yte = (y >= 5).astype(int), (yte >= 5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=0.05, tol=1e-8, max_iter=3000).fit(X.astype(np.float64), y)
    ours = BlasLogisticRegression(C=0.05, tol=1e-8, max_iter=3000).fit(X, y)
    assert ours.coef_.shape == ref.coef_.shape and ours.intercept_.shape == ref.intercept_.shape
    assert ours.coef_.dtype == np.float32  # the features' precision: no float64 copy was needed
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    f_ref, f_ours = _objective(ref, X, y), _objective(ours, X, y)
    assert abs(f_ours - f_ref) <= 1e-4 * f_ref, (f_ours, f_ref)
    scale = np.abs(ref.coef_).max()
    assert np.abs(ours.coef_ - ref.coef_).max() <= 0.02 * scale
    assert np.abs(ours.predict_proba(Xte) - ref.predict_proba(Xte)).max() < 0.02
    assert (ours.predict(Xte) == ref.predict(Xte)).mean() >= 0.99


def test_class_and_sample_weights_enter_the_objective_as_in_scikit_learn(digits):
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads.logistic import BlasLogisticRegression

    X, y, Xte, _ = digits
    keep = (y != 3) | (np.arange(len(y)) % 5 == 0)  # class 3 made rare: "balanced" matters
    X, y = X[keep], y[keep]
    sw = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    kw = {"C": 0.05, "tol": 1e-8, "max_iter": 3000, "class_weight": "balanced"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(**kw).fit(X.astype(np.float64), y, sample_weight=sw)
    ours = BlasLogisticRegression(**kw).fit(X, y, sample_weight=sw)
    assert np.abs(ours.predict_proba(Xte) - ref.predict_proba(Xte)).max() < 0.02
    plain = BlasLogisticRegression(C=0.05, tol=1e-8, max_iter=3000).fit(X, y)
    assert np.abs(plain.predict_proba(Xte) - ref.predict_proba(Xte)).max() > 0.05  # the weights did count


def test_default_stops_when_the_objective_stops_moving_not_at_the_cap(digits):
    from pipeline.heads.registry import make_head

    X, y, Xte, yte = digits
    est = make_head("logistic").estimator
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning: it stopped by its rule
        est.fit(X, y)
    assert est.converged_ and est.n_iter_[0] < 300 < est.max_iter
    tight = make_head("logistic", {"tol": 1e-9}).estimator.fit(X, y)
    assert tight.n_iter_[0] > est.n_iter_[0]
    assert abs(est.score(Xte, yte) - tight.score(Xte, yte)) <= 0.01


def test_a_warm_start_reaches_the_same_answer_in_fewer_iterations(digits):
    from pipeline.heads.logistic import BlasLogisticRegression
    from pipeline.heads.paths import warm_start_from

    X, y, Xte, _ = digits
    previous = BlasLogisticRegression(C=0.02, tol=1e-7, max_iter=2000).fit(X, y)
    cold = BlasLogisticRegression(C=0.03, tol=1e-7, max_iter=2000).fit(X, y)
    warm = BlasLogisticRegression(C=0.03, tol=1e-7, max_iter=2000)
    warm_start_from(warm, previous)
    warm.fit(X, y)
    assert warm.n_iter_[0] < cold.n_iter_[0]
    assert np.abs(warm.predict_proba(Xte) - cold.predict_proba(Xte)).max() < 0.01
    assert abs(_objective(warm, X, y) - _objective(cold, X, y)) <= 1e-5 * _objective(cold, X, y)


def test_the_fit_is_the_same_on_one_thread_or_several(digits, monkeypatch):
    """Parts summed on threads (BLAS on one each) in a cut that does not depend on the thread count, in
    order: the same steps, bit for bit, on a laptop, a search worker limited to one thread and a server."""
    from threadpoolctl import threadpool_limits

    from pipeline.heads import logistic

    monkeypatch.setattr(logistic, "PART_BYTES", 300 * 1280 * 4)  # several parts of the digits' rows
    X, y, _, _ = digits
    fits = {}
    for threads in (1, 2):
        with threadpool_limits(threads), logistic.part_threads() as (pool, ahead):
            assert (pool is None) == (threads == 1) and ahead == threads
        with threadpool_limits(threads):
            fits[threads] = logistic.BlasLogisticRegression(C=0.1).fit(X, y)
    assert fits[1].n_iter_[0] == fits[2].n_iter_[0] > 5
    np.testing.assert_array_equal(fits[1].coef_, fits[2].coef_)
    np.testing.assert_array_equal(fits[1].intercept_, fits[2].intercept_)


def test_streamed_fit_equals_the_in_memory_fit(digits_cache, monkeypatch):
    """Full-batch over HDF5 chunks: the same objective summed in pieces, so the same fit to float rounding."""
    from pipeline.cache.reader import Data
    from pipeline.cache.store import FeatureCache
    from pipeline.heads import fitting
    from pipeline.heads.fitting import fit_model, predict_rows

    monkeypatch.setattr(fitting, "FULL_BATCH_BYTES", 256 * 1280 * 4)  # chunks of 256 rows: several a pass
    with FeatureCache(digits_cache) as c:
        tr, va, te = c.rows("train"), c.rows("val"), c.rows("test")
        memory = Data.from_cache(c, c.default_layer(), np.arange(c.n_rows), streamed=False)
        streamed = Data.from_cache(c, c.default_layer(), np.arange(c.n_rows), streamed=True)
    a = fit_model(memory, tr, va, "logistic", {"C": 0.1}, ["standardize"])
    b = fit_model(streamed, tr, va, "logistic", {"C": 0.1}, ["standardize"], chunk_rows=256)
    assert b.streamed and b.stats["passes"] >= b.model.steps[-1][1].n_iter_[0]
    assert b.stats["chunk_reads"] >= 2 * b.stats["passes"]  # every pass read the rows in several chunks
    ea, eb = a.model.steps[-1][1], b.model.steps[-1][1]
    assert type(eb).__name__ == "BlasLogisticRegression"
    np.testing.assert_allclose(eb.coef_, ea.coef_, atol=2e-3 * np.abs(ea.coef_).max())
    pa, pb = predict_rows(a.model, memory, te, 10), predict_rows(b.model, streamed, te, 10)
    assert np.abs(pa.proba - pb.proba).max() < 5e-3
    assert (pa.y_pred == pb.y_pred).mean() >= 0.995


def test_a_fitted_head_saves_and_loads_through_the_trusted_list(digits, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from pipeline.heads.logistic import BlasLogisticRegression
    from pipeline.heads.persist import load_skops, save_model

    X, y, Xte, _ = digits
    model = Pipeline([("head", BlasLogisticRegression(C=0.1).fit(X, y))])
    kind, files = save_model(tmp_path, model)
    back = load_skops(tmp_path / files[0])
    assert kind == "sklearn" and isinstance(back.steps[-1][1], LogisticRegression)
    np.testing.assert_array_equal(back.predict_proba(Xte), model.predict_proba(Xte))
