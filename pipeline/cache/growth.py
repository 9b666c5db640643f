"""Bringing a complete cache up to date at the cost of what changed: nothing, a segment, or a rewrite.

* nothing: the cache holds exactly the rows wanted (in any order);
* a segment (:mod:`pipeline.cache.segments`): every cached row is still wanted as it is (same key, content,
  label and split) and some rows are new: only the new rows are written, into a file of their own; past
  ``MAX_SEGMENTS`` segments they are merged into one (the base is not touched);
* a rewrite of the whole cache (a new generation; segments of the old one are removed): rows were removed
  or relabelled, the classes changed, the segments would outgrow the base, ``--rebuild``, or the cache
  predates segments or source identities.

Every file is written by :func:`pipeline.cache.write.write_cache`: whole, fsynced, renamed into place.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.h5 import write_error
from pipeline.cache.match import key_rows
from pipeline.cache.segments import segment_dir, segment_name
from pipeline.cache.store import FeatureCache
from pipeline.cache.write import PartRows, Row, write_cache
from pipeline.utils.io import fsync_dir

MAX_SEGMENTS = 16  # more, and the segments are merged into one


@dataclass
class CacheFiles:
    """What one run writes, and with what: the same arguments for a base and for a segment."""

    final: Path
    class_names: list[str]
    layer_dims: dict[str, int]
    attrs: dict[str, Any]
    parts: dict[str, PartRows]
    dtype: str = "float32"
    compression: str = "none"
    donors: Sequence[FeatureCache] = field(default_factory=tuple)


def row_columns(rows: list[Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keys, content ids (UTF-8 bytes), labels and splits of ``rows`` as arrays."""
    keys = np.asarray([r.key.encode("utf-8") for r in rows], dtype="S")
    ids = np.asarray([r.digest.encode("utf-8") for r in rows], dtype="S")
    return keys, ids, np.asarray([r.label for r in rows]), np.asarray([r.split for r in rows])


def new_rows(old: FeatureCache, rows: list[Row], class_names: list[str]) -> list[Row] | None:
    """The rows of ``rows`` that ``old`` lacks, when every row of ``old`` is among ``rows`` as it is (an
    append); None when anything else changed (a rewrite)."""
    if old.class_names != class_names or not rows:
        return None
    keys, ids, labels, split = row_columns(rows)
    at = key_rows(old, keys)
    found = at >= 0
    at = at[found]
    if int(found.sum()) != old.n_rows or len(np.unique(at)) != old.n_rows:
        return None  # a cached row is gone (or a key repeats)
    same = (old.ids.raw[at] == ids[found]) & (old.split[at] == split[found])
    same &= (old.labels[at] == labels[found]).reshape(len(at), -1).all(axis=1)
    if not same.all():
        return None
    return [r for r, f in zip(rows, found.tolist(), strict=True) if not f]


def update_cache(
    spec: CacheFiles, old: FeatureCache | None, rows: list[Row], rewrite: bool, added: list[Row] | None = None
) -> str:
    """Write what ``rows`` needs beyond ``old``; return what was done: ``unchanged``, ``segment``,
    ``merged`` or ``rewritten``. ``added``: the rows beyond ``old``, known already (``rows`` are then
    just those: every row of ``old`` is kept as it is)."""
    if added is None and not (rewrite or old is None or old.generation is None):
        added = new_rows(old, rows, spec.class_names)
    if added is not None and not added:
        prune_segments(spec.final, old.segments)
        return "unchanged"
    if added is None:
        _rewrite(spec, old, rows)
        return "rewritten"
    if _outgrows(old, len(added)):
        _rewrite(spec, old, _rows_of(old, 0) + added)
        return "rewritten"
    if len(old.segments) + 1 > MAX_SEGMENTS:
        merged = _rows_of(old, old.base_rows) + added
        path = _write_segment(spec, old, merged, 1, old.last_run + 1, sources=(old, *spec.donors))
        prune_segments(spec.final, [path])
        return "merged"
    path = _write_segment(spec, old, added, old.last_run + 1, old.last_run + 1, spec.donors)
    prune_segments(spec.final, [*old.segments, path])
    return "segment"


def _outgrows(old: FeatureCache, n_new: int) -> bool:
    """Segments holding more rows than the base: one rewrite now keeps reads and merges cheap."""
    return old.n_rows - old.base_rows + n_new > old.base_rows


def _rewrite(spec: CacheFiles, old: FeatureCache | None, rows: list[Row]) -> None:
    attrs = {**spec.attrs, "generation": uuid.uuid4().hex}
    write_cache(
        spec.final, rows, spec.class_names, spec.layer_dims, attrs, old, spec.parts, spec.dtype,
        spec.compression, donors=spec.donors,
    )  # fmt: skip
    prune_segments(spec.final, [])  # the old generation's segments: never served again


def _write_segment(
    spec: CacheFiles, old: FeatureCache, rows: list[Row], first: int, last: int, sources
) -> Path:
    path = segment_dir(spec.final) / segment_name(first, last)
    if not path.parent.is_dir():
        try:
            path.parent.mkdir()
            fsync_dir(spec.final.parent)  # the folder's entry is durable before a segment in it counts
        except OSError as e:
            raise write_error(path.parent, e) from None
    attrs = {**spec.attrs, "segment_of": old.generation, "segment_first": first, "segment_last": last}
    write_cache(
        path, rows, spec.class_names, spec.layer_dims, attrs, None, spec.parts, spec.dtype,
        spec.compression, donors=tuple(sources),
    )  # fmt: skip
    return path


def _rows_of(old: FeatureCache, start: int) -> list[Row]:
    """``old``'s rows from ``start`` on, as the writer takes them (a merge or a rewrite copies them)."""
    return [
        Row(
            old.keys[i],
            old.ids[i],
            old.label_value(i),
            int(old.split[i]),
            int(old.sizes[i]),
            int(old.mtimes[i]),
        )
        for i in range(start, old.n_rows)
    ]


def prune_segments(final: Path, keep: Sequence[Path]) -> None:
    """Remove every file in the segment folder but ``keep``: other generations, superseded segments and
    temporary files of killed writers (called under the cache's lock, after the new state is in place)."""
    d = segment_dir(final)
    if not d.is_dir():
        return
    kept = {Path(p).name for p in keep}
    for p in d.iterdir():
        if p.name not in kept:
            with contextlib.suppress(OSError):
                p.unlink()
    if not kept:
        with contextlib.suppress(OSError):
            d.rmdir()
