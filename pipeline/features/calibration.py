"""What a ``tflite-int8`` engine is calibrated on: a deterministic sample of the dataset's own train images.

Full-integer quantization fixes the int8 range of every activation from the float model's activations on
a few representative images, so the images chosen change the features: their identity (where they come
from, how many, a digest of their content digests) goes into the cache fingerprint and into the name of
the converted model, and int8 rows never mix with float rows or with rows of another calibration.

The sample is the ``extract.calibration`` train images whose sample *key* hashes lowest (the rule
``data.limit`` uses), so it is a function of the dataset alone. Adding images changes it only when a new
image ranks among those first candidates; its int8 cache is then a new file. Only the candidates are read
to learn their split; the images themselves are decoded only when a model has to be converted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.sources import Dataset, Sample, sample_digest
from pipeline.data.splits import assign_split
from pipeline.utils.errors import FeatcacheError

#: Bump when the selection or the representative dataset changes (changes every int8 fingerprint).
CALIBRATION_RECIPE = 1


@dataclass(frozen=True)
class Calibration:
    """The calibration set: ``key`` identifies it, ``load(image_size)`` decodes it (N×S×S×3 float32, 0..255)."""

    key: dict[str, Any]
    load: Callable[[int], np.ndarray] = field(compare=False, repr=False)

    def images(self, image_size: int) -> np.ndarray:
        x = self.load(image_size)
        if not len(x):
            raise FeatcacheError("tflite-int8: none of the calibration images could be read")
        return x


def _ranked(ds: Dataset) -> list[Sample]:
    return sorted(ds.samples, key=lambda s: hashlib.blake2b(s.key.encode(), digest_size=8).digest())


def train_sample(ds: Dataset, n: int, val_fraction: float, test_fraction: float) -> list[tuple[Sample, str]]:
    """Up to ``n`` (sample, content digest) of distinct train images, lowest key hash first.

    The split is the one extraction assigns (content-hashed, or fixed by the layout); unreadable
    candidates are skipped (extraction reports them).
    """
    from pipeline.data.decode import DecodeError

    out, seen = [], set()
    for s in _ranked(ds):
        try:
            d = sample_digest(ds, s)
        except (DecodeError, OSError):
            continue
        split = assign_split(
            d, fixed=s.split, group=s.group, val_fraction=val_fraction, test_fraction=test_fraction
        )
        if split == "train" and d not in seen:
            seen.add(d)
            out.append((s, d))
            if len(out) == n:
                break
    return out


def from_samples(ds: Dataset, pairs: list[tuple[Sample, str]], resize: str, decode: str, source: str):
    """The calibration set of ``pairs`` (sample, digest), read from ``ds`` as extraction reads them."""
    digest = hashlib.sha256("\n".join(sorted(d for _, d in pairs)).encode()).hexdigest()
    samples = [s for s, _ in pairs]

    def load(size: int) -> np.ndarray:
        from pipeline.data.images import numpy_batches

        kept = [
            x[np.flatnonzero(ok)]
            for _, x, ok, _ in numpy_batches(ds, samples, size, resize, 16, decode=decode)
        ]
        return np.concatenate(kept).astype(np.float32, copy=False) if kept else np.zeros((0, size, size, 3))

    return Calibration({"source": source, "images": len(pairs), "digest": digest}, load)


def for_config(cfg, ds: Dataset) -> Calibration | None:
    """The calibration set of a ``tflite-int8`` extraction of ``ds``, or the gate set of a ``tflite-dynamic``
    one (:mod:`pipeline.features.fidelity`): the same sample; None for every other engine."""
    engine = cfg.extract.engine
    if engine not in ("tflite-int8", "tflite-dynamic"):
        return None
    d = cfg.data
    pairs = train_sample(ds, cfg.extract.calibration, d.val_fraction, d.test_fraction)
    if not pairs:
        does = "calibrates" if engine == "tflite-int8" else "checks its features"
        raise FeatcacheError(f"extract.engine={engine} {does} on train images: {ds.source} has none readable")
    return from_samples(ds, pairs, cfg.backbone.resize, d.decode, "train")


def from_images(ds: Dataset, n: int, resize: str, decode: str) -> Calibration:
    """The first ``n`` of ``ds``'s images by key hash, whatever their split (images the caller chose)."""
    pairs, seen = [], set()
    for s in _ranked(ds):
        d = sample_digest(ds, s)
        if d not in seen:
            seen.add(d)
            pairs.append((s, d))
        if len(pairs) == n:
            break
    return from_samples(ds, pairs, resize, decode, "given")


def from_probe(n: int) -> Calibration:
    """``n`` crops of scikit-learn's two sample photos (the engines' probe images): for callers with no
    dataset of their own, such as a :class:`~pipeline.transformer.FeatureExtractor` given no calibration."""
    from sklearn.datasets import load_sample_images

    h = hashlib.sha256()
    for img in load_sample_images().images:
        h.update(np.ascontiguousarray(img).tobytes())

    def load(size: int) -> np.ndarray:
        from pipeline.features.probes import probe_images

        return probe_images(size, n)

    return Calibration({"source": "probe", "images": n, "digest": h.hexdigest()}, load)


def recorded(part: dict[str, Any], cache_meta: dict[str, Any]) -> Calibration:
    """The calibration set an int8 cache's feature key names (its ``engine`` entry). Its images are read
    again from the cache's dataset only if the converted model is no longer in ``engines/``, and only if
    that dataset still yields the same set."""
    key = dict(part.get("calibration") or {})

    def load(size: int) -> np.ndarray:
        from pipeline.data.sources import load_dataset
        from pipeline.utils.config import DataConfig

        data = dict((cache_meta.get("config") or {}).get("data") or {})
        again = None
        try:
            if key.get("source") == "probe":
                again = from_probe(int(key["images"]))
            elif key.get("source") == "train":
                names = DataConfig.__dataclass_fields__
                ds = load_dataset(DataConfig(**{k: v for k, v in data.items() if k in names}))
                pairs = train_sample(ds, int(key["images"]), data["val_fraction"], data["test_fraction"])
                resize = str(cache_meta.get("resize", "stretch"))
                again = from_samples(ds, pairs, resize, data["decode"], "train")
        except (FeatcacheError, OSError, KeyError, TypeError, ValueError):
            again = None
        if again is None or again.key != key:
            raise FeatcacheError(
                "the int8 model that made this cache's features is gone from its engines/ folder, and its "
                "calibration images cannot be read again: re-extract the cache (featcache extract --rebuild)"
            )
        return again.load(size)

    return Calibration(key, load)


def engine_part(calibration: Calibration) -> dict[str, Any]:
    """The ``engine`` entry of an int8 cache's feature key."""
    return {"name": "tflite-int8", "recipe": CALIBRATION_RECIPE, "calibration": dict(calibration.key)}


#: Bump when the dynamic-range conversion changes (changes every ``tflite-dynamic`` fingerprint).
DYNAMIC_RECIPE = 1

#: The ``engine`` entry of a ``tflite-dynamic`` cache's feature key. Its gate set is not in it: dynamic-range
#: quantization calibrates nothing, so the features depend on the model alone and adding images to the
#: dataset keeps the cache (the gate set's figures are in the cache's ``engine_fidelity`` attribute).
DYNAMIC_PART = {"name": "tflite-dynamic", "recipe": DYNAMIC_RECIPE}
