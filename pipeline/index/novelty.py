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


def sampled_threshold(train_blocks, val: np.ndarray, percentile: float, n_val: int) -> dict[str, Any]:
    """:func:`val_threshold` for a large cache, without building its index: the novelty of ``val`` (a
    sample of the ``n_val`` val rows' features) to the nearest of *every* train row, the train rows
    streamed in ``train_blocks`` (memory: one block), exact."""
    Q = l2_normalize(val)
    best = np.full(len(Q), -np.inf, np.float32)
    for block in train_blocks:
        best = np.maximum(best, (Q @ l2_normalize(block).T).max(axis=1))
    scores = 1.0 - best.astype(np.float64)
    threshold = float(np.percentile(scores, percentile))
    return {
        "threshold": round(threshold, 6),
        "percentile": percentile,
        "score": "1 - cosine to the nearest train row",
        "index": f"exact, on {len(Q)} of the {n_val} val rows",
        "val_sample": len(Q),
        "val_flagged": round(float((scores > threshold).mean()), 4),
    }
