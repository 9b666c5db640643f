"""Exact cosine-similarity search over cached features by blocked matrix products.

Rows are L2-normalized, then the upper triangle of ``X @ X.T`` is computed one ``block × block`` tile at a
time, so the similarity matrix never exists whole: memory is the features plus one tile. Each tile updates
every row's two nearest neighbours and collects the pairs at or above a floor (:func:`cosine_scan`, the
audit's all-pairs pass); :func:`cosine_topk` is the same tiles for queries against rows (``find``'s exact
search, and the truth an approximate index is measured against).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SimilarityScan:
    """Every pair at or above ``floor`` (``a < b``) and each row's two nearest neighbours."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    top_index: np.ndarray  # (n, 2): nearest and second-nearest row, -1 when there is none
    top_sim: np.ndarray  # (n, 2): their cosine similarities, -inf when there is none


def l2_normalize(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def merge_top(best_sim, best_idx, S: np.ndarray, offset: int) -> None:
    """Fold the ``k`` largest entries of each row of ``S`` (columns shifted by ``offset``) into the top
    ``k`` held in ``best_sim``/``best_idx`` (``k`` = their width), best first."""
    k = best_sim.shape[1]
    if S.shape[1] == 0:
        return
    take = min(k, S.shape[1])
    idx = np.argpartition(-S, take - 1, axis=1)[:, :take]
    sims = np.take_along_axis(S, idx, axis=1)
    all_sim = np.concatenate([best_sim, sims], axis=1)
    all_idx = np.concatenate([best_idx, idx + offset], axis=1)
    order = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]
    best_sim[:] = np.take_along_axis(all_sim, order, axis=1)
    best_idx[:] = np.take_along_axis(all_idx, order, axis=1)


def cosine_topk(Q: np.ndarray, X: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``X`` most cosine-similar to each row of ``Q``, exactly: (similarities, row
    indices), each ``len(Q) × k``, best first; -inf and -1 where ``X`` has fewer than ``k`` rows.

    ``X`` may be already normalized (normalizing twice changes nothing); memory is one ``len(Q) × block`` tile.
    """
    Qn, Xn = l2_normalize(Q), l2_normalize(X)
    best_sim = np.full((len(Qn), k), -np.inf, np.float32)
    best_idx = np.full((len(Qn), k), -1, np.int64)
    for j0 in range(0, len(Xn), block):
        merge_top(best_sim, best_idx, Qn @ Xn[j0 : j0 + block].T, j0)
    best_idx[~np.isfinite(best_sim)] = -1
    return best_sim, best_idx


def cosine_scan(X: np.ndarray, floor: float, block: int = 1024) -> SimilarityScan:
    """All pairs with cosine similarity ≥ ``floor`` and the top-2 neighbours of every row, exactly.

    Memory beyond the normalized features is one ``block × block`` float32 tile (4 MiB at 1024).
    """
    Xn = l2_normalize(X)
    n = len(Xn)
    top_sim = np.full((n, 2), -np.inf, np.float32)
    top_idx = np.full((n, 2), -1, np.int64)
    found_a, found_b, found_s = [], [], []
    for i0 in range(0, n, block):
        Xi = Xn[i0 : i0 + block]
        for j0 in range(i0, n, block):
            S = Xi @ Xn[j0 : j0 + block].T
            if i0 == j0:
                S[np.arange(len(S)), np.arange(len(S))] = -np.inf  # a row is not its own neighbour
                r, c = np.nonzero(np.triu(S >= floor, k=1))
            else:
                r, c = np.nonzero(S >= floor)
            found_a.append(r + i0)
            found_b.append(c + j0)
            found_s.append(S[r, c])
            merge_top(top_sim[i0 : i0 + len(S)], top_idx[i0 : i0 + len(S)], S, j0)
            if i0 != j0:
                merge_top(top_sim[j0 : j0 + S.shape[1]], top_idx[j0 : j0 + S.shape[1]], S.T, i0)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    top_idx[~np.isfinite(top_sim)] = -1
    return SimilarityScan(
        cat(found_a, np.int64), cat(found_b, np.int64), cat(found_s, np.float32), top_idx, top_sim
    )


#: a k-nearest search of at least this many distances (queries × rows) runs on FAISS's exact ``knn``
#: (float32 products, a heap per query): 2,000 queries among 800k × 128 rows, 2 cores, 2.97 s against
#: 10.3 s for scikit-learn's ``kneighbors`` in the same minute (5.3 s on a quieter host), the same 50
#: neighbours for 99.996 % of the pairs, distances within 4e-6; smaller searches stay scikit-learn's
FAISS_KNN_FROM = 10**9


def euclidean_topk(Q: np.ndarray, X: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``X`` nearest to each row of ``Q`` in Euclidean distance, exactly, as scikit-learn's
    ``kneighbors`` gives them (distances as float64, nearest first), on ``threads`` OpenMP threads."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads))
    try:
        D, ind = faiss.knn(np.ascontiguousarray(Q, np.float32), np.ascontiguousarray(X, np.float32), k)
    finally:
        faiss.omp_set_num_threads(before)
    return np.sqrt(np.maximum(D, 0.0)).astype(np.float64), ind.astype(np.int64)
