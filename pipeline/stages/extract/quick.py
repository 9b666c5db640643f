"""A rerun over local files that finds every cached row unchanged: only the new files are looked at.

Decided on arrays (:mod:`pipeline.cache.match`): each listed file's key, size and mtime against the cache's
columns, the labels against the cached labels. A folder source gives them from its listing
(:class:`pipeline.data.listing.FileListing`) without a :class:`Sample` per file. When every cached row is
listed again as it was (same key, stat and label, the same split settings, so the same split), the run
narrows its dataset to the files the cache does not have: samples, digests, the backbone, the rows and the
write (a segment, :mod:`pipeline.cache.growth`) then cost those files only, and a rerun with nothing new
costs a listing and a stat per file. Anything else (a removed, changed or relabelled file, other classes
or split settings, shards, arrays, multi-label, augmented views) takes the general path, which looks at
every row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from pipeline.cache.match import among, key_rows, unchanged, utf8_keys
from pipeline.data.listing import file_stats
from pipeline.data.samples import Dataset
from pipeline.data.storage import is_url
from pipeline.stages.extract.job import ExtractJob
from pipeline.utils.forked import ForkedFill, can_fork

#: the ``[data]`` settings a cached row's split follows besides its key and content
SPLIT_SETTINGS = ("val_fraction", "test_fraction", "group_pattern")


def narrow_to_new(job: ExtractJob) -> Callable[[], bool] | None:
    """Narrow ``job.ds`` to the files ``job.old`` lacks, when every cached file is listed again with its
    label; None when not. Returns the check that those files are also unchanged (size and mtime): done here
    when nothing is new (a no-op answers at once); otherwise started on a forked child, where there is fork,
    to run beside the backbone's start-up, and the caller must ask it before anything is written."""
    if not _applies(job):
        return None
    old, ds = job.old, job.ds
    keys, labels = _keys_labels(ds)
    rows = key_rows(old, keys)
    listed = rows >= 0
    seen = np.zeros(old.n_rows, bool)
    seen[rows[listed]] = True
    if int(listed.sum()) != old.n_rows or not seen.all():
        return None  # a cached file is gone
    if not np.array_equal(labels[listed], old.labels[rows[listed]]):
        return None  # relabelled (moved between class folders)
    new = np.flatnonzero(~listed)
    check = _stat_check(job, rows, listed, later=len(new) > 0)
    if not len(new) and not check():
        return None  # a cached file changed: the general path says which and takes it again
    samples = ds.listing.samples(new) if ds.listing is not None else [ds.samples[i] for i in new.tolist()]
    job.ds = dataclasses.replace(ds, samples=samples)
    job.narrowed = True
    return check


def _stat_check(job: ExtractJob, rows: np.ndarray, listed: np.ndarray, later: bool) -> Callable[[], bool]:
    """Whether every listed cached file has its cached size and mtime: read now, or (``later``) on a
    forked child whose answer the returned function waits for."""
    ds, n = job.ds, len(rows)
    later = later and can_fork()
    workers = 1 if later else job.cfg.extract.threads  # later: one core, the other starts the backbone

    def fill(sizes, mtimes):
        if ds.listing is not None:
            ds.listing.stats(workers, out=(sizes, mtimes))
        else:
            file_stats([s.path for s in ds.samples], workers, out=(sizes, mtimes))

    pending = ForkedFill(fill, [(n, np.int64), (n, np.int64)]) if later else None

    def check() -> bool:
        try:
            if pending is not None:
                sizes, mtimes = pending.result()
            else:
                sizes, mtimes = np.empty(n, np.int64), np.empty(n, np.int64)
                fill(sizes, mtimes)
        except OSError:
            return False  # a file gone since the listing
        return bool(unchanged(job.old, rows[listed], sizes[listed], mtimes[listed]).all())

    if pending is None:  # now: nothing new (no start-up to run beside), or no fork here
        answer = check()
        return lambda: answer
    return check


def _keys_labels(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Every listed file's key (UTF-8) and class index: a folder's from its listing."""
    if ds.listing is not None:
        return ds.listing.keys(), ds.listing.labels(ds.class_names)
    label_of = ds.label_index()
    labels = np.fromiter((label_of[s.label] for s in ds.samples), np.int64, len(ds.samples))
    return utf8_keys([s.key for s in ds.samples]), labels


def _applies(job: ExtractJob) -> bool:
    old, ds = job.old, job.ds
    if old is None or old.generation is None or "source_id" not in old.meta:
        return False
    if ds.multilabel or not ds.is_files or ds.problems or old.multilabel or old.class_names != ds.class_names:
        return False
    if job.key.get("augment_views") or is_url(ds.source):
        return False
    recorded = (old.meta.get("config") or {}).get("data") or {}
    now = job.cfg.to_dict()["data"]
    if any(recorded.get(k) != now.get(k) for k in SPLIT_SETTINGS):
        return False
    if ds.listing is not None:
        return True  # local files, listed from a folder
    return all(s.path and not (s.digest or s.member or s.index >= 0 or s.stamp) for s in ds.samples)


def cached_among(job: ExtractJob) -> set[str]:
    """The digests of the narrowed dataset's files that the cache holds already (a copied file)."""
    digests = np.asarray([d.encode() for d, _, _ in job.digests.values()], dtype="S")
    if not len(digests):
        return set()
    return {d.decode() for d in digests[among(digests, job.old.ids.raw)].tolist()}
