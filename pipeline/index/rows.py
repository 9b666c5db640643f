"""The few rows of a cache holding given keys or content ids, found in one pass over the column: no dict
of every row (predict, find). Reading many rows fast is the cache's own :meth:`FeatureCache.features`."""

from __future__ import annotations

import numpy as np

from pipeline.cache.match import among


def find_rows(column, wanted) -> dict[str, int]:
    """``{value: row}`` for the values of ``wanted`` found in ``column`` (a cache's ``ids`` or ``keys``: a
    list, or a NumPy array of str), the first row of each; one pass, and no dict of every row."""
    wanted = set(wanted)
    if not wanted:
        return {}
    found: dict[str, int] = {}
    raw = hasattr(column, "raw")  # the cache's own column: UTF-8 bytes, compared as such
    if raw or isinstance(column, np.ndarray):
        values = column.raw if raw else column
        want = np.asarray(sorted(w.encode() if raw else w for w in wanted))  # its own width: none cut short
        for r in np.flatnonzero(among(values, want)).tolist():
            found.setdefault(values[r].decode() if raw else str(values[r]), r)
        return found
    for r, v in enumerate(column):
        if v in wanted and v not in found:
            found[v] = r
    return found
