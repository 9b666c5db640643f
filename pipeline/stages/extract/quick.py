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
from pipeline.stages.extract.job import ExtractJob, start_backbone
from pipeline.utils.forked import in_child

#: the ``[data]`` settings a cached row's split follows besides its key and content
SPLIT_SETTINGS = ("val_fraction", "test_fraction", "group_pattern")

#: listings this long have their files stat'ed by a forked child (shorter ones: not worth a fork)
FORK_FROM = 50_000


def narrow_to_new(job: ExtractJob) -> bool:
    """Narrow ``job.ds`` to the files ``job.old`` lacks, when every cached row is listed as it is."""
    if not _applies(job):
        return False
    old, ds = job.old, job.ds
    keys = ds.listing.keys() if ds.listing is not None else utf8_keys([s.key for s in ds.samples])
    rows = key_rows(old, keys)
    try:
        sizes, mtimes = _stats(job, rows)
    except OSError:
        return False  # a file gone since the listing: the general path says which
    hit = unchanged(old, rows, sizes, mtimes)
    seen = np.zeros(old.n_rows, bool)
    seen[rows[hit]] = True
    if int(hit.sum()) != old.n_rows or not seen.all():
        return False  # a cached file is gone or changed
    if not np.array_equal(_labels(ds)[hit], old.labels[rows[hit]]):
        return False  # relabelled (moved between class folders)
    new = np.flatnonzero(~hit)
    if (rows[new] >= 0).any():
        return False  # a cached file's content may have changed
    samples = ds.listing.samples(new) if ds.listing is not None else [ds.samples[i] for i in new.tolist()]
    job.ds = dataclasses.replace(ds, samples=samples)
    job.narrowed = True
    return True


def _stats(job: ExtractJob, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every listed file's size and mtime. A folder's are taken by a forked child (:mod:`pipeline.utils.forked`)
    while this process goes on: when files are new and every cached key is listed (growth, most likely) it
    imports the backbone meanwhile (seconds of TensorFlow the pass needs anyway), else it takes half the
    files itself."""
    ds, threads = job.ds, job.cfg.extract.threads
    if ds.listing is None:
        return file_stats([s.path for s in ds.samples], threads)
    listing, n = ds.listing, len(rows)
    found = rows >= 0
    grows = found.sum() == job.old.n_rows and not found.all() and not job.cfg.cluster.address
    cut = n if grows else n // 2  # the child's files: [0, cut)
    if n < FORK_FROM:
        return listing.stats(threads)

    def fill(out: np.ndarray, forked: bool) -> None:
        listing.stats_into(out, 0, cut, 1 if forked else threads)

    with in_child(fill, (2, n)) as child:
        if grows:
            start_backbone(job.cfg)
        mine = np.empty((2, n), np.int64)
        listing.stats_into(mine, cut, n, threads)
        mine[:, :cut] = child()[:, :cut]
    return mine[0], mine[1]


def _labels(ds: Dataset) -> np.ndarray:
    """Every listed file's class index."""
    if ds.listing is not None:
        return ds.listing.labels(ds.class_names)
    label_of = ds.label_index()
    return np.fromiter((label_of[s.label] for s in ds.samples), np.int64, len(ds.samples))


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
