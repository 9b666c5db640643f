"""A scikit-learn transformer from images to (cached) backbone features.

    Pipeline([("features", FeatureExtractor()), ("clf", LogisticRegression())]).fit(paths, y)

Images are keyed by content, so features computed once, by this transformer or by ``featcache extract``
with the same backbone settings, are never computed again: ``transform`` runs the backbone only on
images it has not seen. The cache accumulates (``<cache_dir>/transform-<backbone>-<fingerprint>.h5``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from pipeline.data.sources import Dataset, Sample, storable_key
from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheValueError


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Image paths, or an N×H×W[×C] uint8 array, → N×D features of a frozen pretrained backbone.

    Stateless: ``fit`` learns nothing (the backbone is frozen), so the transformer is safe inside
    cross-validation and ``clone``. With ``engine="tflite-int8"`` every call uses the same int8 model, calibrated
    on ``calibration`` (image paths or an array, e.g. a sample of the training images; at most
    ``n_calibration`` of them) or, when None, on crops of scikit-learn's two sample photos.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str = "imagenet",
        layer: str | None = None,
        pooling: str = "avg",
        image_size: int = 0,
        resize: str = "stretch",
        cache_dir: str = "cache",
        batch_size: int = 32,
        engine: str = "auto",
        progress: bool = False,
        decode: str = "dct",
        calibration=None,
        n_calibration: int = 32,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.pooling = pooling
        self.image_size = image_size
        self.resize = resize
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.engine = engine
        self.progress = progress
        self.decode = decode
        self.calibration = calibration
        self.n_calibration = n_calibration

    def fit(self, X, y=None):
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: fit learns nothing, transform works on an unfitted clone
        tags.input_tags.two_d_array = False  # images: paths or N×H×W[×C] arrays, not feature matrices
        tags.input_tags.string = True
        return tags

    def _config(self):
        return load_config(
            None,
            {
                "backbone.name": self.backbone,
                "backbone.weights": self.weights,
                "backbone.layers": [self.layer] if self.layer else [],
                "backbone.pooling": self.pooling,
                "backbone.image_size": self.image_size,
                "backbone.resize": self.resize,
                "extract.cache_dir": self.cache_dir,
                "extract.batch_size": self.batch_size,
                "extract.engine": self.engine,
                "extract.progress": self.progress,
                "data.on_error": "fail",  # a transformer must return one row per input
                "data.decode": self.decode,  # dct | exact, as ``featcache extract --set data.decode=...``
                "extract.calibration": self.n_calibration,
            },
        )

    def transform(self, X) -> np.ndarray:
        from pipeline.cache.store import FeatureCache
        from pipeline.stages.extract import extract

        ds = _as_dataset(X)
        cfg = self._config()
        result = extract(cfg, dataset=ds, keep_missing=True, calibration=self._calibration(cfg))
        with FeatureCache(result.path) as cache:
            row_of = {k: i for i, k in enumerate(cache.keys)}
            rows = np.asarray([row_of[s.key] for s in ds.samples])
            return cache.features(self.layer or None, rows)

    def _calibration(self, cfg):
        """The int8 calibration set: the same for every call, whatever images it transforms."""
        if cfg.extract.engine != "tflite-int8":
            return None
        from pipeline.features.calibration import from_images, from_probe

        if self.calibration is None:
            return from_probe(cfg.extract.calibration)
        return from_images(_as_dataset(self.calibration), cfg.extract.calibration, self.resize, self.decode)


EXPECTED = "image paths (str or os.PathLike) or an N×H×W[×C] array of pixels"


def _as_dataset(X) -> Dataset:
    """Inputs become a one-class dataset keyed by absolute path (files) or by content (arrays)."""
    if isinstance(X, (str, bytes, os.PathLike)):
        raise FeatcacheValueError(f"FeatureExtractor: expected a sequence of {EXPECTED}, got one path")
    if isinstance(X, np.ndarray) and X.dtype != object:
        if X.dtype.kind not in "biuf":
            raise FeatcacheValueError(f"FeatureExtractor: expected {EXPECTED}, got an array of {X.dtype}")
        if X.ndim not in (3, 4) or (X.ndim == 4 and X.shape[-1] not in (1, 3, 4)):
            raise FeatcacheValueError(
                f"FeatureExtractor: expected N×H×W or N×H×W×C images, got shape {X.shape}"
            )
        if not np.isfinite(X).all():
            raise FeatcacheValueError("FeatureExtractor: pixel values must be finite (no NaN or inf)")
        from pipeline.data.sources import digest_bytes

        arrays = np.asarray(X)
        if arrays.dtype != np.uint8:
            arrays = np.clip(np.rint(arrays), 0, 255).astype(np.uint8)
        samples = [
            Sample(f"array/{digest_bytes(a.tobytes() + repr(a.shape).encode())}", "", index=i)
            for i, a in enumerate(arrays)
        ]
        return Dataset("transform", "<array>", samples, [""], arrays=arrays)
    try:
        items = list(X)
    except TypeError:
        raise FeatcacheValueError(f"FeatureExtractor: expected {EXPECTED}, got {type(X).__name__}") from None
    samples = []
    for i, p in enumerate(items):
        if not isinstance(p, (str, os.PathLike)):
            raise FeatcacheValueError(
                f"FeatureExtractor: expected {EXPECTED}; item {i} is {type(p).__name__} ({str(p)[:40]!r})"
            )
        full = os.path.abspath(os.fspath(p))
        if not Path(full).is_file():
            raise FeatcacheValueError(f"FeatureExtractor: image not found: {p}")
        samples.append(Sample(storable_key(full), "", path=full))
    return Dataset("transform", "<paths>", samples, [""])
