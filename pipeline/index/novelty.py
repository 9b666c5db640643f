"""Novelty: how far an image's features are from everything a run was trained on.

The score is ``1 − cos`` to the nearest *train* row of the run's cache (the k-nearest-neighbour
out-of-distribution score of Sun et al., ICML 2022, with k = 1 on L2-normalized features): 0 for an image
the run trained on, near 0 for one like its training images, large for an image of another domain.
A run's threshold is the ``index.novelty_percentile`` percentile (default 95) of its val rows' scores,
recorded in ``metrics.json`` → ``novelty``; an image above it is ``novel``. By construction about
100 − percentile % of in-distribution images are flagged (measured: ``benchmarks/bench_index.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.index.neighbours import l2_normalize
from pipeline.utils.config import SPLITS

#: val rows a threshold is estimated on from ``index.exact_below`` cache rows on (every train row is searched)
VAL_SAMPLE = 500
PRODUCT_ROWS = 2048  # train rows a val sample is multiplied with at once (500 × 2048 float32: 4 MB)


def novelty_scores(index, X: np.ndarray) -> np.ndarray:
    """``1 − cos`` of each row of ``X`` to its nearest train row of ``index``'s cache (NaN: no train rows)."""
    train = index.cache.split == SPLITS.index("train")
    if not train.any() or not len(X):
        return np.full(len(X), np.nan)
    sims, _ = index.search(X, 1, allowed=train)
    return (1.0 - sims[:, 0]).astype(np.float64)


def val_threshold(index, percentile: float) -> dict[str, Any] | None:
    """What a run records: the threshold (the ``percentile`` of the val rows' novelty), the percentile,
    and the share of val rows above it; None when the cache has no val or no train rows."""
    val = index.cache.rows("val")
    if not len(val) or not (index.cache.split == SPLITS.index("train")).any():
        return None
    scores = novelty_scores(index, index.vectors(val))
    threshold = float(np.percentile(scores, percentile))
    return {
        "threshold": round(threshold, 6),
        "percentile": percentile,
        "score": "1 - cosine to the nearest train row",
        "index": index.name,
        "val_flagged": round(float((scores > threshold).mean()), 4),
    }


class NearestTrain:
    """The best cosine of each of a few val rows to the train rows seen so far, fed block by block (a
    block is never copied: its norms divide the products): a large cache's threshold without its index,
    exact against every train row (memory: one block), e.g. while they are read."""

    def __init__(self, val: np.ndarray):
        self.Q = l2_normalize(val)
        self.best = np.full(len(self.Q), -np.inf, np.float32)

    def add(self, block: np.ndarray) -> None:
        for i in range(0, len(block), PRODUCT_ROWS):  # products of a few MB, whatever the block
            part = block[i : i + PRODUCT_ROWS]
            S = self.Q @ part.T
            S /= np.maximum(np.sqrt(np.einsum("ij,ij->i", part, part)), 1e-12)
            np.maximum(self.best, S.max(axis=1), out=self.best)

    def threshold(self, percentile: float, n_val: int) -> dict[str, Any]:
        """What a run records (see :func:`val_threshold`), from the ``n_val`` val rows' sample fed here."""
        scores = 1.0 - self.best.astype(np.float64)
        threshold = float(np.percentile(scores, percentile))
        return {
            "threshold": round(threshold, 6),
            "percentile": percentile,
            "score": "1 - cosine to the nearest train row",
            "index": f"exact, on {len(self.Q)} of the {n_val} val rows",
            "val_sample": len(self.Q),
            "val_flagged": round(float((scores > threshold).mean()), 4),
        }
