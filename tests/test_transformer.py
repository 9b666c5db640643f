"""The scikit-learn transformer: images in, cached features out, inside a real Pipeline."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from pipeline.cache.store import FeatureCache
from pipeline.transformer import FeatureExtractor


def test_pipeline_fits_and_predicts_on_image_paths(photo_folder, tmp_path):
    paths = sorted(photo_folder.rglob("*.*"))
    y = np.array([p.parent.name for p in paths])
    fx = FeatureExtractor(image_size=64, cache_dir=str(tmp_path / "c"), batch_size=8)
    model = Pipeline([("features", fx), ("clf", LogisticRegression(max_iter=500))]).fit(paths[::2], y[::2])
    assert (model.predict(paths[1::2]) == y[1::2]).mean() >= 0.8  # china vs flower photos: easy
    assert clone(fx).get_params() == fx.get_params()


def test_transform_reuses_cached_rows_and_matches_extract(photo_folder, tmp_path):
    paths = sorted(photo_folder.rglob("*.*"))
    fx = FeatureExtractor(image_size=64, cache_dir=str(tmp_path / "c"), batch_size=8)
    first = fx.transform(paths[:6])
    both = fx.transform(paths[:10])  # the first six come from the cache
    np.testing.assert_array_equal(both[:6], first)
    (cache_file,) = (tmp_path / "c").glob("transform-*.h5")
    with FeatureCache(cache_file) as c:
        assert c.n_rows == 10  # accumulates, never drops rows it was not asked about
    again = fx.transform(paths[3:5])
    np.testing.assert_array_equal(again, first[3:5])


def test_transform_arrays(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 40, 3), dtype=np.uint8)
    fx = FeatureExtractor(image_size=64, cache_dir=str(tmp_path / "c"))
    out = fx.transform(images)
    assert out.shape == (5, 1280) and np.isfinite(out).all()
    np.testing.assert_array_equal(fx.transform(images[::-1]), out[::-1])
