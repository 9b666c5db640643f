"""How ``train`` reads a large cache: the train rows once, into the array its transforms overwrite, with the
novelty pass on the rows as they are read; the scaler's statistics without a full-size temporary; PCA of a
tall matrix without a centered copy."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from tests.test_train import train_cfg


@pytest.mark.parametrize("sparse", [False, True])
def test_read_parts_reads_each_part_in_one_pass_handing_over_the_first(digits_cache, monkeypatch, sparse):
    """Train and val+test rows in one pass over the file (slices of a few rows here), every row where it
    belongs, ``each`` fed the first part's rows in order as they land; parts covering under half the rows
    they span are read row by row, the same values."""
    from pipeline.cache import reader
    from pipeline.cache.store import FeatureCache

    monkeypatch.setattr(reader, "READ_BYTES", 37 * 1280 * 4)  # many slices of the small cache
    monkeypatch.setattr(reader, "HANDOVER_ROWS", 100)
    with FeatureCache(digits_cache) as cache:
        layer = cache.layer_name(None)
        train, rest = cache.rows("train"), np.union1d(cache.rows("val"), cache.rows("test"))
        if sparse:
            train, rest = train[::5], rest[::5]
        seen = []
        got = reader.read_parts(cache, layer, [train, rest], lambda b: seen.append(b.copy()))
        assert np.array_equal(got[0], cache.features(layer, train))
        assert np.array_equal(got[1], cache.features(layer, rest))
    assert np.array_equal(np.concatenate(seen), got[0])
    assert all(len(b) >= 100 for b in seen[:-1])


def test_a_failure_on_a_block_stops_the_read_and_is_raised(digits_cache, monkeypatch):
    from pipeline.cache import reader
    from pipeline.cache.store import FeatureCache

    def fail(block):
        raise ValueError("no room")

    monkeypatch.setattr(reader, "HANDOVER_ROWS", 100)
    with FeatureCache(digits_cache) as cache:
        with pytest.raises(ValueError, match="no room"):
            reader.read_parts(cache, cache.layer_name(None), [cache.rows("train")], fail)


def test_train_holds_the_features_about_once(digits_cache, tmp_path):
    """Peak of Python-side allocations while ``train`` fits the default head on a 100k-row cache, in the
    large-cache mode (novelty without an index): the train rows read once and standardized in place, the
    val and test rows apart — not every row and then a copy of the train rows (1.9× before; now 1.4×: the
    cache's columns, a read span and the run's own files are the rest)."""
    from benchmarks.bench_scale import write_synthetic_cache
    from pipeline.stages.train import train

    rows, dim = 100_000, 256
    cache = write_synthetic_cache(tmp_path / "cache", rows, dim, digits_cache)
    cfg = train_cfg(cache, tmp_path / "runs", "logistic")
    cfg.index.exact_below = 10
    tracemalloc.start()
    try:
        run = train(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["novelty"]["val_sample"] > 0 and metrics["test"]["accuracy"] > 0.5
    assert peak < 1.5 * rows * dim * 4, f"peak {peak / (rows * dim * 4):.2f}x the features"


@pytest.mark.parametrize("constant", [False, True])
def test_the_scaler_learns_what_standard_scaler_fit_learns(constant):
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads.transforms import FIT_BLOCK_ROWS, fit_scaler

    rng = np.random.default_rng(0)
    X = (rng.standard_normal((3 * FIT_BLOCK_ROWS + 17, 40)) * 5 + 300).astype(np.float32)
    if constant:
        X[:, 3] = 7.0
    ref = StandardScaler().fit(X)
    got = fit_scaler(StandardScaler(), X)
    assert np.allclose(got.mean_, ref.mean_, rtol=0, atol=1e-6 * 5)
    assert np.allclose(got.var_, ref.var_, rtol=1e-5, atol=1e-9)
    assert np.array_equal(got.scale_ == 1.0, ref.scale_ == 1.0) and got.n_samples_seen_ == len(X)
    assert np.allclose(got.transform(X[:50]), ref.transform(X[:50]), atol=1e-4)


def test_pca_of_a_tall_matrix_eigendecomposes_its_covariance():
    from pipeline.heads.transforms import TALL, build_transforms

    ((_, tall),) = build_transforms(["pca:8"], n_samples=TALL * 64, n_features=64)
    ((_, wide),) = build_transforms(["pca:8"], n_samples=TALL * 64 - 1, n_features=64)
    assert tall.svd_solver == "covariance_eigh" and wide.svd_solver == "auto"
    rng = np.random.default_rng(1)
    X = rng.standard_normal((TALL * 64, 64)).astype(np.float32) @ rng.standard_normal((64, 64)).astype(
        np.float32
    )
    from sklearn.decomposition import PCA

    exact = PCA(8, svd_solver="full").fit(X.astype(np.float64))
    got = tall.fit(X)
    assert np.allclose(np.abs(got.components_ @ exact.components_.T), np.eye(8), atol=1e-3)


def test_pca_from_blocks_is_scikit_learns_covariance_eigh():
    """The same attributes, signs and float32 results as scikit-learn's own fit of the whole matrix."""
    from sklearn.decomposition import PCA

    from pipeline.heads.transforms import pca_from_blocks

    rng = np.random.default_rng(2)
    X = (rng.standard_normal((3000, 48)) @ rng.standard_normal((48, 48)) + 5).astype(np.float32)
    want = PCA(6, svd_solver="covariance_eigh").fit(X)
    got = pca_from_blocks(PCA(6, svd_solver="covariance_eigh"), (X[i : i + 700] for i in range(0, 3000, 700)))
    for name in (
        "components_",
        "mean_",
        "explained_variance_",
        "explained_variance_ratio_",
        "singular_values_",
    ):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype == np.float32, name
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * np.abs(b).max(), err_msg=name)
    assert (got.n_components_, got.n_samples_, got.n_features_in_) == (6, 3000, 48)
    assert got.noise_variance_ == pytest.approx(want.noise_variance_, rel=1e-3)
    np.testing.assert_allclose(
        got.transform(X), want.transform(X), atol=2e-3 * np.abs(want.transform(X)).max()
    )


@pytest.mark.parametrize("chain", [["standardize", "pca:8"], ["l2", "pca:8"], ["l2", "standardize", "pca:8"]])
def test_a_chain_ending_in_pca_is_fitted_in_blocks_as_on_the_read_matrix(chain):
    """A search worker's chain read a block at a time from the shared features equals the one ``train``
    fits on the matrix it read, bit for bit, and holds no full-size copy while it is fitted."""
    from sklearn.pipeline import make_pipeline

    from pipeline.cache.reader import Data
    from pipeline.heads.fitting import prepare, transform_rows
    from pipeline.heads.transforms import blocked_pca, build_transforms

    rng = np.random.default_rng(3)
    n, d = 60_000, 64
    X = (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3).astype(np.float32)
    data = Data("", "", rng.integers(0, 3, n), d, np.arange(n), X)
    val = np.arange(3, n, 70)
    fit_rows = np.setdiff1d(np.arange(n), val)

    def steps():
        return build_transforms(chain, n_samples=len(fit_rows), n_features=d)

    assert blocked_pca(steps())
    tracemalloc.start()
    try:
        blocked = prepare(data, fit_rows, val, steps())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * len(fit_rows) * d * 4  # blocks and the PCA's output, not the fit rows' copy
    read = prepare(data, fit_rows, val, steps(), train_X=data.take(fit_rows))
    np.testing.assert_array_equal(blocked.X, read.X)
    np.testing.assert_array_equal(blocked.X_val, read.X_val)
    np.testing.assert_array_equal(transform_rows(blocked.steps, data, val), blocked.X_val)
    sk = make_pipeline(*[est for _, est in steps()])  # scikit-learn's own fit of the whole matrix
    want = sk.fit_transform(data.take(fit_rows))
    np.testing.assert_allclose(blocked.X, want, atol=2e-3 * np.abs(want).max())


def test_shared_data_reaches_a_worker_process_by_name_not_by_copy(digits_cache):
    """A search's features in shared memory: the pickled object is a few kilobytes (the labels and rows, not
    the features), a spawned process reads the same values through it, and release frees the block."""
    import multiprocessing as mp
    import pickle
    from multiprocessing.shared_memory import SharedMemory

    from pipeline.cache import reader
    from pipeline.cache.reader import Data
    from pipeline.cache.store import FeatureCache

    with FeatureCache(digits_cache) as cache:
        rows = cache.rows("train")
        plain = Data.from_cache(cache, cache.layer_name(None), rows, False)
        shared = Data.from_cache(cache, cache.layer_name(None), rows, False, shared=True)
    assert np.array_equal(shared.X, plain.X)
    blob = pickle.dumps(shared)
    assert len(blob) < len(pickle.dumps(plain)) - plain.X.nbytes + 4096
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_row_sums, (blob,)) == pytest.approx(plain.X.sum(axis=1).tolist(), rel=1e-6)
    name = shared.shm.name
    shared.release()
    assert not reader.shared_memory_room(1 << 60)  # no room: workers get a pickled copy, never a SIGBUS
    assert shared.X is None and shared.shm is None
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)


def _row_sums(blob: bytes) -> list[float]:
    import pickle

    data = pickle.loads(blob)
    assert not data.X.flags.writeable  # a worker reads the block, never writes it
    return data.X.sum(axis=1).tolist()


@pytest.mark.parametrize("env, huge", [(None, False), ("1", True)])
def test_a_featcache_process_takes_fresh_arrays_on_base_pages(tmp_path, env, huge):
    """numpy's huge pages cost 3–5× more to fault in on a lazily backed VM (``pipeline.utils.pages``): a
    ``featcache`` process turns them off for itself and its workers, unless the user set
    ``NUMPY_MADVISE_HUGEPAGE``."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.cli import main; sys.argv = ['featcache', 'cache', 'ls', '--cache-dir',"
        f" {str(tmp_path)!r}]; main(); import numpy._core.multiarray as m; print(m._get_madvise_hugepage())"
    )
    environ = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if env is not None:
        environ["NUMPY_MADVISE_HUGEPAGE"] = env
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(huge)
