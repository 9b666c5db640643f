"""The few rows of a cache holding given keys or content ids, found in one pass over the column: no dict
of every row (predict, find). Reading many rows fast is the cache's own :meth:`FeatureCache.features`."""

from __future__ import annotations

import numpy as np


def find_rows(column, wanted) -> dict[str, int]:
    """``{value: row}`` for the values of ``wanted`` found in ``column`` (a cache's ``ids`` or ``keys``: a
    list, or a NumPy array of str), the first row of each; one pass, and no dict of every row."""
    wanted = set(wanted)
    if not wanted:
        return {}
    if hasattr(column, "raw"):  # the cache's own column: UTF-8 bytes, compared as such
        raw = column.raw
        rows = np.flatnonzero(np.isin(raw, np.asarray(sorted(w.encode() for w in wanted), dtype="S")))
        found: dict[str, int] = {}
        for r in rows.tolist():
            found.setdefault(raw[r].decode(), r)
        return found
    if isinstance(column, np.ndarray):
        rows = np.flatnonzero(np.isin(column, np.asarray(sorted(wanted), dtype=column.dtype)))
        found: dict[str, int] = {}
        for r in rows.tolist():
            found.setdefault(str(column[r]), r)
        return found
    found = {}
    for r, v in enumerate(column):
        if v in wanted and v not in found:
            found[v] = r
    return found
