"""Measuring a feature engine against the reference: real photo crops to run, the error and agreement
measures every check uses, and speed timed fairly (interleaved, best of several)."""

from __future__ import annotations

import time

import numpy as np

#: Validation / speed-probe batch: this many crops of real photos.
PROBE_IMAGES = 16


def max_relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """``max|got - want| / max|want|``: the feature error measure every engine check uses."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    if not np.all(np.isfinite(got)):
        return float("inf")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    return diff / scale if scale > 0 else diff


def probe_images(size: int, n: int = PROBE_IMAGES) -> np.ndarray:
    """``n`` deterministic crops/flips of scikit-learn's two sample photos, resized to ``size`` (raw 0..255)."""
    from sklearn.datasets import load_sample_images

    from pipeline.data.preprocess import resize_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427×640 RGB
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[top : top + side, left : left + side]
        if i % 4 >= 2:
            crop = crop[:, ::-1]
        out.append(np.asarray(resize_images(np.ascontiguousarray(crop), size)))
    return np.stack(out).astype(np.float32)


def cosine_stats(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[float, float]:
    """The mean and the minimum per-image cosine similarity of ``got`` to ``want``, each the worst over layers."""
    mean, low = 1.0, 1.0
    for layer, w in want.items():
        a, b = np.asarray(got[layer], np.float64), np.asarray(w, np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
        mean, low = min(mean, float(cos.mean())), min(low, float(cos.min()))
    return mean, low


def mean_cosine(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """The lowest, over layers, of the mean per-image cosine similarity of ``got`` to ``want``."""
    return cosine_stats(got, want)[0]


def compare(engine, reference, images) -> dict[str, float]:
    """Per-layer :func:`max_relative_diff` of ``engine``'s features against ``reference``'s on ``images``."""
    got, want = engine(images), reference(images)
    return {layer: max_relative_diff(got[layer], want[layer]) for layer in want}


def best_rates(engines_: list, x, reps: int = 5) -> list[float]:
    """Images/s of each engine on ``x``: best of ``reps`` runs, interleaved so load bursts hit all alike."""
    for fn in engines_:
        fn(x)  # warm-up: traces / allocates / packs weights
    best = [float("inf")] * len(engines_)
    for _ in range(reps):
        for i, fn in enumerate(engines_):
            t = time.perf_counter()
            fn(x)
            best[i] = min(best[i], time.perf_counter() - t)
    return [len(x) / b for b in best]
