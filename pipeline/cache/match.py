"""Which cached row a listed file is, for a million rows at once: keys, sizes and mtimes as arrays.

A rerun's question for every file is "is it the row I cached?" (same key, same size and mtime: then its
content digest, label and split are the cached ones and the file is not read). Asked row by row in Python
it costs a dict of a million tuples and seconds; asked here it is a sort and a binary search.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def utf8_keys(keys: Sequence[str]) -> np.ndarray:
    return np.asarray([k.encode("utf-8") for k in keys], dtype="S")


def positions(pool: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per value, the first position in ``pool`` holding it; -1 where there is none: one sort, one search."""
    if not len(pool) or not len(values):
        return np.full(len(values), -1, np.int64)
    order = np.argsort(pool, kind="stable")
    at = order[np.clip(np.searchsorted(pool[order], values), 0, len(pool) - 1)]
    return np.where(pool[at] == values, at, -1)


def key_rows(cache, keys: np.ndarray) -> np.ndarray:
    """Per key (UTF-8 bytes), the cache row holding it; -1 where there is none."""
    raw = cache.keys.raw
    if len(raw) == len(keys) and np.array_equal(raw, keys):  # listed in the cache's order: a rerun
        return np.arange(len(keys), dtype=np.int64)
    return positions(raw, keys)


def unchanged(cache, rows: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray) -> np.ndarray:
    """Per listed file with cache row ``rows`` (-1: none), whether that row has its size and mtime."""
    at = np.maximum(rows, 0)
    return (rows >= 0) & (cache.sizes[at] == sizes) & (cache.mtimes[at] == mtimes) & (sizes >= 0)


def among(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Per value, whether ``pool`` holds it (``np.isin``), sorting only the smaller of the two: ten thousand
    new digests against a million cached ones cost a search per cached one, not a sort of them all. Against
    a much larger pool the search runs on the first 8 bytes as integers, then on whole strings only where
    those meet (10,000 new digests among 1M cached: 0.12 s against 0.39 s)."""
    if not len(values) or not len(pool):
        return np.zeros(len(values), bool)
    if len(pool) > 8 * len(values):
        pv, pp = _prefix(values), _prefix(pool)
        s = np.sort(pv)
        near = s[np.clip(np.searchsorted(s, pp), 0, len(s) - 1)] == pp  # pool entries a value's prefix meets
        keep = np.isin(pv, pp[near])
        out = np.zeros(len(values), bool)
        out[keep] = _among(values[keep], pool[near])
        return out
    return _among(values, pool)


def _prefix(a: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each byte string (zero-padded), as one unsigned integer each."""
    width = min(8, a.dtype.itemsize)
    b = np.zeros((len(a), 8), np.uint8)
    b[:, :width] = np.ascontiguousarray(a).view(np.uint8).reshape(len(a), a.dtype.itemsize)[:, :width]
    return b.view(np.uint64).ravel()


def _among(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    if not len(values) or not len(pool):
        return np.zeros(len(values), bool)
    if len(pool) <= len(values):
        s = np.sort(pool)
        return s[np.clip(np.searchsorted(s, values), 0, len(s) - 1)] == values
    order = np.argsort(values, kind="stable")
    s = values[order]
    at = np.clip(np.searchsorted(s, pool), 0, len(s) - 1)
    hit = np.zeros(len(s), bool)
    hit[at[s[at] == pool]] = True  # the first of equal values is the one found
    out = np.empty(len(values), bool)
    out[order] = hit[np.searchsorted(s, s)]
    return out
