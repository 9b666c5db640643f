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

import numpy as np

from pipeline.cache.match import among, key_rows, unchanged, utf8_keys
from pipeline.data.listing import file_stats
from pipeline.data.samples import Dataset
from pipeline.data.storage import is_url
from pipeline.stages.extract.job import ExtractJob

#: the ``[data]`` settings a cached row's split follows besides its key and content
SPLIT_SETTINGS = ("val_fraction", "test_fraction", "group_pattern")


def narrow_to_new(job: ExtractJob) -> bool:
    """Narrow ``job.ds`` to the files ``job.old`` lacks, when every cached row is listed as it is."""
    if not _applies(job):
        return False
    old, ds = job.old, job.ds
    try:
        keys, sizes, mtimes, labels = _columns(ds, job.cfg.extract.threads)
    except OSError:
        return False  # a file gone since the listing: the general path says which
    rows = key_rows(old, keys)
    hit = unchanged(old, rows, sizes, mtimes)
    seen = np.zeros(old.n_rows, bool)
    seen[rows[hit]] = True
    if int(hit.sum()) != old.n_rows or not seen.all():
        return False  # a cached file is gone or changed
    if not np.array_equal(labels[hit], old.labels[rows[hit]]):
        return False  # relabelled (moved between class folders)
    new = np.flatnonzero(~hit)
    if (rows[new] >= 0).any():
        return False  # a cached file's content may have changed
    samples = ds.listing.samples(new) if ds.listing is not None else [ds.samples[i] for i in new.tolist()]
    job.ds = dataclasses.replace(ds, samples=samples)
    job.narrowed = True
    return True


def _columns(ds: Dataset, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every listed file's key (UTF-8), size, mtime and class index: a folder's from its listing."""
    if ds.listing is not None:
        sizes, mtimes = ds.listing.stats(threads)
        return ds.listing.keys(), sizes, mtimes, ds.listing.labels(ds.class_names)
    sizes, mtimes = file_stats([s.path for s in ds.samples], threads)
    label_of = ds.label_index()
    labels = np.fromiter((label_of[s.label] for s in ds.samples), np.int64, len(ds.samples))
    return utf8_keys([s.key for s in ds.samples]), sizes, mtimes, labels


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
