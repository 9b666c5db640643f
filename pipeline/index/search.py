"""The similarity index of one cache layer: exact below ``index.exact_below`` rows, FAISS from there on.

:func:`open_index` gives a :class:`CacheIndex` that answers the k most cosine-similar cached rows to query
vectors, optionally among some rows only (a split, some classes) and without a row itself (a cached key
asked about). Exact search is :func:`pipeline.index.neighbours.cosine_topk` over the features in memory;
the FAISS index (its type: :mod:`pipeline.index.kinds`) is read from beside the cache when it is whole and
made for exactly these rows (:mod:`pipeline.index.store`), caught up when the cache only gained rows, and
built (then kept) otherwise. A filter that leaves fewer than ``exact_below`` rows is searched exactly
among them; a wider one asks FAISS for more neighbours until ``k`` pass it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.cache.match import positions
from pipeline.index.kinds import SCAN_EF_SEARCH, IndexKind, choose_kind
from pipeline.index.neighbours import SimilarityScan, cosine_scan, cosine_topk, l2_normalize
from pipeline.index.store import index_dir, load, row_identities, save

BLOCK = 8192  # rows read from the cache (and added to FAISS) at a time


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class CacheIndex:
    """Search one layer of an open :class:`~pipeline.cache.store.FeatureCache`."""

    cache: object
    layer: str
    exact_below: int
    kind: IndexKind | None = None  # None: exact search
    faiss_index: object = None
    row_of: np.ndarray | None = None  # FAISS id → cache row
    built: dict = field(default_factory=dict)  # what opening cost: seconds, rows added, rebuilt or not
    normalized: np.ndarray | None = None  # every row's L2-normalized features, once read

    @property
    def n(self) -> int:
        return self.cache.n_rows

    @property
    def name(self) -> str:
        return "exact" if self.kind is None else self.kind.factory

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """L2-normalized features of ``rows`` (all when None; kept in memory for exact search)."""
        if rows is None:
            if self.normalized is None:
                self.normalized = l2_normalize(self.cache.features(self.layer))
            return self.normalized
        if self.normalized is not None:
            return self.normalized[rows]
        return l2_normalize(self.cache.features(self.layer, rows))

    def search(
        self,
        Q: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        exclude: np.ndarray | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows to each query: (cosine similarities, cache rows), best first, padded with
        -inf / -1. ``allowed``: a boolean mask of the rows that may be answered; ``exclude``: one row per
        query never answered for it (-1: none); ``ef_search``: an HNSW index's breadth, when not its own."""
        Q = l2_normalize(Q)
        extra = 0 if exclude is None else 1
        sub = None if allowed is None else np.flatnonzero(allowed)
        if self.kind is None or (sub is not None and len(sub) < self.exact_below):
            X = self.vectors(sub) if sub is not None else self.vectors()
            sims, idx = cosine_topk(Q, X, min(k + extra, max(len(X), 1)))
            rows = np.where(idx >= 0, idx if sub is None else sub[np.maximum(idx, 0)], -1)
        else:
            sims, rows = self._faiss_search(Q, k + extra, allowed, ef_search)
        return _drop(sims, rows, exclude, k)

    def _faiss_search(self, Q, k, allowed, ef_search=None):
        share = 1.0 if allowed is None else max(allowed.mean(), 1e-9)
        want = k * (4 if self.kind.quantized else 1)
        fetch = min(self.faiss_index.ntotal, math.ceil(want / share * 1.5))
        while True:
            self._breadth(fetch, ef_search)
            sims, ids = self.faiss_index.search(np.ascontiguousarray(Q, np.float32), fetch)
            rows = np.where(ids >= 0, self.row_of[np.maximum(ids, 0)], -1)
            if self.kind.quantized:
                sims = self._exact_sims(Q, rows)
            if allowed is not None:
                ok = (rows >= 0) & allowed[np.maximum(rows, 0)]
                sims, rows = np.where(ok, sims, -np.inf), np.where(ok, rows, -1)
                order = np.argsort(-sims, axis=1, kind="stable")
                sims, rows = np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)
            enough = (rows[:, : min(k, rows.shape[1])] >= 0).all()
            if enough or fetch >= self.faiss_index.ntotal:
                return sims[:, :k], rows[:, :k]
            fetch = min(self.faiss_index.ntotal, fetch * 4)

    def _exact_sims(self, Q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Cosine of each query to each of its candidate rows, from the cache's own features (-inf: none)."""
        sims = np.empty(rows.shape, np.float32)
        for s in range(0, len(Q), 256):  # memory: 256 queries × their candidates' vectors
            part = np.maximum(rows[s : s + 256], 0)
            uniq, inverse = np.unique(part, return_inverse=True)
            V = self.vectors(uniq)[inverse.reshape(part.shape)]
            sims[s : s + 256] = np.einsum("qd,qkd->qk", Q[s : s + 256], V)
        sims = np.where(rows >= 0, sims, -np.inf)
        order = np.argsort(-sims, axis=1, kind="stable")
        rows[:] = np.take_along_axis(rows, order, 1)
        return np.take_along_axis(sims, order, 1)

    def _breadth(self, fetch: int, ef_search: int | None = None) -> None:
        import faiss

        space = faiss.ParameterSpace()
        if self.kind.ef_search:
            ef = self.kind.ef_search if ef_search is None else ef_search
            space.set_index_parameter(self.faiss_index, "efSearch", max(ef, fetch))
        if self.kind.nprobe:
            space.set_index_parameter(self.faiss_index, "nprobe", self.kind.nprobe)

    def scan(self, floor: float, neighbours: int = 16) -> SimilarityScan:
        """Pairs at or above ``floor`` and every row's two nearest neighbours (the audit's pass): exact
        all pairs below the threshold; through the index above it, among each row's ``neighbours`` nearest
        (a group of more than ``neighbours`` copies of one image reports some of its pairs only)."""
        if self.kind is None:
            return cosine_scan(self.vectors(), floor)
        top_sim = np.full((self.n, 2), -np.inf, np.float32)
        top_idx = np.full((self.n, 2), -1, np.int64)
        found_a, found_b, found_s = [], [], []
        for start in range(0, self.n, BLOCK):
            rows = np.arange(start, min(start + BLOCK, self.n))
            sims, nb = self.search(self.vectors(rows), neighbours, exclude=rows, ef_search=SCAN_EF_SEARCH)
            top_sim[rows], top_idx[rows] = sims[:, :2], nb[:, :2]
            hit = (nb > rows[:, None]) & (sims >= floor)  # each pair once, from its smaller row
            r, c = np.nonzero(hit)
            found_a.append(rows[r])
            found_b.append(nb[r, c])
            found_s.append(sims[r, c])
        cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
        a, b = cat(found_a, np.int64), cat(found_b, np.int64)
        a, b, s = _mutual_pairs(a, b, cat(found_s, np.float32), top_idx, top_sim, floor)
        return SimilarityScan(a, b, s, top_idx, top_sim)


def _mutual_pairs(a, b, s, top_idx, top_sim, floor):
    """Pairs seen only from the larger row (the smaller one had ``neighbours`` closer rows) are added; by
    arrays (a pair is the code ``smaller · n + larger``), never a set of every pair found."""
    n = len(top_idx)
    i = np.repeat(np.arange(n, dtype=np.int64), top_idx.shape[1])
    j, sim = top_idx.ravel().astype(np.int64), top_sim.ravel()
    late = (j >= 0) & (j < i) & (sim >= floor)
    ej, ei, es = j[late], i[late], sim[late]
    new = ~np.isin(ej * n + ei, a * n + b)
    if new.any():
        a, b = np.concatenate([a, ej[new]]), np.concatenate([b, ei[new]])
        s = np.concatenate([s, es[new]]).astype(np.float32)
    return a, b, s


def _drop(sims, rows, exclude, k):
    """Each query's own row removed (``exclude``), then the first ``k``."""
    if exclude is not None:
        own = rows == np.asarray(exclude)[:, None]
        sims, rows = np.where(own, -np.inf, sims), np.where(own, -1, rows)
        order = np.argsort(-sims, axis=1, kind="stable")
        sims, rows = np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)
    sims, rows = sims[:, :k], rows[:, :k]
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return sims, rows


def open_index(
    cache, layer: str, cfg, note: Callable[[str], None] = _stderr, progress: bool = False, features=None
):
    """The :class:`CacheIndex` of ``layer`` of the open ``cache`` under the ``[index]`` settings ``cfg``
    (``features``: that layer's rows when the caller already read them)."""
    idx = CacheIndex(cache, layer, cfg.exact_below)
    if features is not None:
        idx.normalized = l2_normalize(features)
    if cache.n_rows < cfg.exact_below:
        return idx
    d = int(cache.dataset(layer).shape[1])
    idx.kind = choose_kind(cache.n_rows, d, cfg.memory_gb)
    folder = index_dir(cache.path, layer)
    expect = {"fingerprint": cache.fingerprint, "layer": layer, "dim": d}
    t0 = time.perf_counter()
    stored, why = load(folder, expect)
    ident = row_identities(cache.keys, cache.ids)
    if why:
        note(f"index {folder.name}: {why}; rebuilding it, never serving it")
    known = _known_rows(stored, ident, idx.kind) if stored is not None else None
    if stored is not None and known is None:
        note(
            f"index {folder.name}: rows of the cache were removed or changed since it was built; rebuilding it"
        )
    if known is not None:
        idx.faiss_index = stored.index
        gone = np.ones(cache.n_rows, bool)
        gone[known] = False
        missing = np.flatnonzero(gone)
        idx.row_of = np.concatenate([known, missing]).astype(np.int64)
        idx.built = {"rebuilt": False, "added": int(len(missing))}
        if len(missing):
            _add(idx, missing, progress)
    else:
        idx.faiss_index = _new_faiss(idx, d, progress)
        idx.row_of = np.arange(cache.n_rows, dtype=np.int64)
        idx.built = {"rebuilt": True, "added": cache.n_rows}
    if idx.built["added"]:
        built = cache.n_rows if idx.built["rebuilt"] else stored.meta.get("built_rows")
        meta = {**expect, "kind": idx.kind.factory, "rows": cache.n_rows, "built_rows": built}
        save(folder, idx.faiss_index, ident[idx.row_of], meta)
    idx.built["seconds"] = time.perf_counter() - t0
    return idx


def _known_rows(stored, ident: np.ndarray, kind: IndexKind) -> np.ndarray | None:
    """The cache rows of the stored index's vectors, in its id order; None when one is gone (or the
    cache has grown into another kind of index): a rebuild."""
    if stored.meta.get("kind") != kind.factory:
        return None
    rows = positions(ident, stored.rows)  # arrays, not a dict of every row
    return None if (rows < 0).any() else rows


def _new_faiss(idx: CacheIndex, d: int, progress: bool):
    import faiss

    index = faiss.index_factory(d, idx.kind.factory, faiss.METRIC_INNER_PRODUCT)
    if idx.kind.trained:
        rng = np.random.default_rng(0)
        take = min(idx.n, max(256 * 40, 64 * index.nlist if hasattr(index, "nlist") else 0, 50_000))
        sample = np.sort(rng.choice(idx.n, take, replace=False))
        index.train(idx.vectors(sample))
    idx.faiss_index = index
    _add(idx, np.arange(idx.n), progress)
    return index


def _add(idx: CacheIndex, rows: np.ndarray, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(rows), desc=f"index {idx.kind.factory}", unit="row", disable=not progress)
    for start in range(0, len(rows), BLOCK):
        part = rows[start : start + BLOCK]
        idx.faiss_index.add(idx.vectors(part))
        bar.update(len(part))
    bar.close()
