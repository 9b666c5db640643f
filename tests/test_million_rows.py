"""The stages at a million rows (issue 40, part 3), checked at small scale by lowering the limits: the audit
fits its fold models on a sample and finds pairs through the index above its thresholds and says so, the
report maps a sample and says so, and rows are read and found without a Python object per row."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest


def _flipped_blobs(n: int = 3000, d: int = 24, k: int = 4, flips: int = 30, seed: int = 0):
    """Four well-separated classes and ``flips`` rows labelled as another class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = (rng.normal(size=(k, d)) * 4)[y] + rng.normal(size=(n, d))
    wrong = rng.choice(n, flips, replace=False)
    y[wrong] = (y[wrong] + 1 + rng.integers(0, k - 1, flips)) % k
    return X.astype(np.float32), y, np.sort(wrong)


def test_label_pass_on_a_sample_scores_every_row_and_finds_flips_outside_it(monkeypatch):
    from pipeline.heads import label_noise
    from pipeline.heads.label_noise import find_label_issues, fit_sample, out_of_fold_proba

    monkeypatch.setattr(label_noise, "SCORE_BLOCK", 500)  # rows scored at a time (65,536 at full size)

    X, y, wrong = _flipped_blobs()
    fit_mask = np.arange(len(y)) % 10 != 0  # one row in ten is "test"
    reads = []

    def read(rows):  # a cache's rows, as the audit hands them: never all of them at once
        reads.append(len(rows))
        return X[rows]

    proba = out_of_fold_proba(read, y, fit_mask, 4, folds=3, fit_rows=400)
    assert proba.shape == (len(y), 4) and np.allclose(proba.sum(axis=1), 1)
    assert reads[0] < 450 and max(reads[1:]) == 500  # the sample, then blocks of the rest
    sample = fit_sample(np.flatnonzero(fit_mask), y, 400, 6, 0)
    assert 380 <= len(sample) <= 420 and np.bincount(y[sample]).min() >= 6
    found = set(find_label_issues(y, proba).rows.tolist())
    outside = [r for r in wrong if r not in set(sample.tolist())]
    assert len(outside) > 20 and sum(r in found for r in outside) >= 0.8 * len(outside)

    # without a sample, the array and the reader give the same probabilities
    whole = out_of_fold_proba(X, y, fit_mask, 4, folds=3)
    np.testing.assert_allclose(whole, out_of_fold_proba(read, y, fit_mask, 4, folds=3), atol=1e-12)


def test_fit_sample_keeps_every_class_and_all_rows_below_its_size():
    from pipeline.heads.label_noise import fit_sample

    rows = np.arange(10_000)
    y = np.where(rows < 9990, 0, 1)  # a class of ten rows
    s = fit_sample(rows, y, 1000, 10, 0)
    assert (y[s] == 1).sum() == 10 and np.all(np.diff(s) > 0)
    assert fit_sample(rows, y, 0, 10, 0) is rows and fit_sample(rows, y, 20_000, 10, 0) is rows
    assert len(fit_sample(rows, None, 500, 0, 1)) == 500


def test_audit_above_its_limits_goes_through_the_index_and_a_sample_and_says_so(digits_cache, tmp_path):
    import pipeline
    from pipeline.cache.store import FeatureCache

    cache = Path(shutil.copy(digits_cache, tmp_path / digits_cache.name))
    with FeatureCache(cache) as c:
        n, n_fit = c.n_rows, int((c.split != 2).sum())
    cfg = pipeline.load_config(None, {"train.cache": str(cache), "extract.progress": "false"})
    small = pipeline.audit(cfg, write_csv=False, folds=2, threshold=0.9)
    big = pipeline.audit(cfg, write_csv=False, folds=2, threshold=0.9, fit_rows=300, index__exact_below=10)
    assert "exact, all pairs" in small.table() and "random sample" not in small.table()
    table = big.table()
    assert f"fitted on a random per-class sample of about 300 of {n_fit} train+val rows" in table
    assert "index HNSW" in table and "nearest neighbours a row" in table
    assert big.rows == n and list(tmp_path.glob("*.index"))
    assert {(p["a"], p["b"]) for p in big.near_duplicates} == {
        (p["a"], p["b"]) for p in small.near_duplicates
    }
    keys = set(FeatureCache(cache).keys)
    assert all(it["key"] in keys and it["given"] != it["suggested"] for it in big.label_issues)


def test_report_map_reads_a_sample_of_runs_and_says_so(digits_cache):
    from pipeline.cache.store import FeatureCache
    from pipeline.stages.report.sections import MAP_RUN, feature_map, map_sample, map_section

    with FeatureCache(digits_cache) as cache:
        n = cache.n_rows
        rows = map_sample(cache.keys, 64, seed=3)
        assert len(rows) == 64 == len(set(rows.tolist())) and rows.max() < n
        runs = np.sort(rows).reshape(-1, MAP_RUN)
        assert np.all(np.diff(runs, axis=1) == 1)  # consecutive rows: a chunk read each, not one per row
        assert len(map_sample(cache.keys, 10 * n)) == n  # all of them when there are no more
        png, shown = feature_map(cache, cache.default_layer(), 64, 20)
    assert png and shown == (64, 20)
    html = map_section(png, "top", shown, n)
    assert f"a random sample of 64 of the {n} cached rows" in html and "report.map_rows" in html
    assert "all 64 cached rows" in map_section(png, "top", shown, 64)


@pytest.mark.parametrize("as_array", [False, True])
def test_find_rows_and_read_rows(digits_cache, as_array):
    from pipeline.cache.store import FeatureCache
    from pipeline.index.rows import find_rows

    with FeatureCache(digits_cache) as cache:
        keys = np.asarray(cache.keys) if as_array else cache.keys
        want = [cache.keys[7], cache.keys[0], "no/such/key"]
        assert find_rows(keys, want) == {cache.keys[7]: 7, cache.keys[0]: 0}
        assert find_rows(keys, []) == {}
        longest = max(cache.keys, key=len)
        assert find_rows(keys, [longest + "x"]) == {}  # not cut to the column's width
        layer = cache.default_layer()
        everything = cache.features(layer)
        rng = np.random.default_rng(0)
        spread = np.sort(rng.choice(cache.n_rows, cache.n_rows // 3, replace=False))
        orders = (rng.permutation(cache.n_rows), rng.choice(cache.n_rows, 9), np.array([5, 3, 5, 0]))
        for rows in (*orders, np.arange(cache.n_rows), np.arange(3, 40), spread):  # the last: in place
            np.testing.assert_array_equal(cache.features(layer, rows), everything[rows])
        assert cache.features(layer, np.zeros(0, int)).shape == (0, everything.shape[1])
