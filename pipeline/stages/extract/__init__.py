"""Stage 1: run the frozen backbone once over a dataset and cache the features.

    sources → digests → what is missing? → batches (:func:`pipeline.data.images.numpy_batches`: decoded and
            shrunk on a thread pool by the compiled area resize, or through tf.data when images are enlarged)
            → engine (compiled TensorFlow or TFLite) → parts on disk (a writer thread) → complete HDF5

With ``[cluster] address`` the missing samples run as shards on Dask workers, and the driver writes what
comes back as the same parts. Augmented views of the train rows (a feature key with ``augment_views``) are
read through tf.data, transformed by seeded augmentation layers and written as parts too. Every unreadable
sample meets ``data.on_error`` in one place, :class:`pipeline.cache.quarantine.Unreadable`.

Only samples whose content digest is not cached yet reach the backbone, so a rerun with nothing changed
does no backbone work (and never imports TensorFlow), adding N images extracts only those N, and an
interrupted run resumes from its last written batch.

The stage's modules: this one (the stage: what is missing, the backbone pass here), :mod:`.job` (the run's
state and its result), :mod:`.cluster` (the pass on a Dask cluster) and :mod:`.views` (augmented views).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.fingerprint import fingerprint
from pipeline.cache.growth import CacheFiles, update_cache
from pipeline.cache.locate import dataset_identity, open_donors, resolve_cache_path, touch_cache
from pipeline.cache.quarantine import Unreadable, quarantine_path, read_quarantine, write_quarantine
from pipeline.cache.schema import cache_attrs
from pipeline.cache.store import FeatureCache
from pipeline.cache.write import (
    BackgroundWriter,
    PartWriter,
    cache_rows,
    clear_partial,
    extraction_lock,
    part_dims,
    remove_stale_temps,
    scan_parts,
)
from pipeline.data.images import numpy_batches
from pipeline.data.sources import Dataset, Sample, content_digests, load_dataset
from pipeline.data.splits import split_counts
from pipeline.features.backbones.hub_presets import settle
from pipeline.features.backbones.registry import check_engine, dynamic_hint, get_spec
from pipeline.features.calibration import Calibration, for_config
from pipeline.stages.extract.cluster import run_on_cluster
from pipeline.stages.extract.job import ExtractJob, ExtractResult, backbone_pass
from pipeline.stages.extract.quick import cached_among, narrow_to_new
from pipeline.stages.extract.views import augmented_views
from pipeline.utils.collector import frozen_gc
from pipeline.utils.config import Config, given_keys, resolve_config
from pipeline.utils.errors import FeatcacheError

__all__ = ["ExtractJob", "ExtractResult", "extract"]


def extract(
    config: Config | str | Path | None = None,
    *,
    rebuild: bool = False,
    dataset: Dataset | None = None,
    keep_missing: bool = False,
    calibration: Calibration | None = None,
    progress_bar: Any = None,
    feature_model: Any = None,
    **options: Any,
) -> ExtractResult:
    """Bring the cache for ``config`` up to date and return what was done.

    ``config`` is a :class:`Config`, a TOML path or None (defaults); keywords override it: dotted keys with
    ``.`` written as ``__`` (``extract(data__source="photos/", backbone__name="vgg16")``) or plain names
    (``extract(data="photos/", backbone="vgg16")``, :func:`pipeline.utils.config.resolve_config`). ``dataset``
    replaces ``[data]``'s source; ``keep_missing`` keeps cached rows that are not in it (an accumulating
    cache, as the scikit-learn transformer uses) instead of dropping them. ``calibration`` replaces the
    sample of train images a ``tflite-int8`` engine is calibrated on. ``progress_bar`` (a tqdm bar) counts
    this extraction's images instead of a bar of its own. ``feature_model``: the ``FeatureModel`` of
    ``[backbone]`` and ``extract.precision`` built already (by compare's check), so it is not built twice;
    one built from other settings is refused (its rows would be stored under this config's fingerprint).
    """
    t_start = time.perf_counter()
    cfg = resolve_config(config, "extract", **options)
    spec = get_spec(cfg.backbone.name)  # an unknown backbone fails before any work
    if spec.preset is not None:
        settle(cfg.backbone, given_keys(cfg), spec.preset)
    if feature_model is not None:
        from pipeline.features.backbones.build import check_built_from

        check_built_from(feature_model, cfg.backbone, cfg.extract.precision)
    cache_dir = Path(cfg.extract.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatcacheError(f"cache_dir {cache_dir}: cannot create ({e.strerror})") from None
    if not os.access(cache_dir, os.W_OK):
        raise FeatcacheError(f"cache_dir {cache_dir}: not writable")

    check_engine(spec, cfg.extract.engine)  # a quantized engine refused for this backbone: before any work
    ds = dataset if dataset is not None else load_dataset(cfg.data, cache_dir / "shards")
    calibration = calibration if calibration is not None else for_config(cfg, ds)
    final, key, ds = resolve_cache_path(cfg, ds, calibration)
    fp = fingerprint(key)
    result = ExtractResult(final, ignored=len(ds.ignored))
    quiet = not cfg.extract.progress
    with extraction_lock(final, cfg.extract.lock_timeout, quiet):
        remove_stale_temps(final)
        old: FeatureCache | None = None
        if final.exists() and not rebuild:
            old = FeatureCache(final)  # a damaged file raises, naming --rebuild
            if old.fingerprint != fp:  # pragma: no cover - the name embeds the fingerprint
                old.close()
                old = None
        if rebuild:
            clear_partial(final)
        bad = Unreadable(cfg.data.on_error)
        job = ExtractJob(cfg, ds, final, key, fp, old, result, bad, calibration, progress_bar, feature_model)
        job.share = not rebuild
        try:
            done = _update(job, t_start, keep_missing)
            touch_cache(final)  # the cache just made is the newest: later stages follow it
            return done
        finally:
            for c in [old, *job.donors]:
                if c is not None:
                    c.close()


def _update(job: ExtractJob, t_start: float, keep_missing: bool, narrow: bool = True) -> ExtractResult:
    """Digest the samples, run the backbone on those not cached yet, and write the new cache if it changed."""
    cfg, ds, old, result = job.cfg, job.ds, job.old, job.result
    # a rerun that lists every cached file again: only new files from here on, once their stats agree
    unchanged = narrow_to_new(job) if narrow and not keep_missing else None
    known = old.file_stats() if old is not None and not job.narrowed else {}
    job.digests, found = content_digests(job.ds, known)
    if old is not None:
        job.cached = cached_among(job) if job.narrowed else set(old.ids)
    job.unreadable.extend(found)  # with ``fail``, the first one stops the run here
    job.parts = scan_parts(job.final, job.fp)
    job.pending = _pending(job)
    if job.pending and job.share:  # rows of the same content in other caches of these features
        wanted = {job.digest(s) for s in job.pending}  # pending: in neither this cache nor its parts
        job.donors, job.donated = open_donors(job.final, job.fp, wanted)
        job.result.donors = [c.path for c in job.donors]
        job.cached |= job.donated
        job.pending = [s for s in job.pending if job.digest(s) not in job.donated]
    try:
        layer_dims, map_shapes = _run_pending(job)
    finally:
        ds.close()  # shard readers: their streams end with this pass
    if unchanged is not None and not unchanged():  # a cached file changed: every row is looked at again
        return _update(_widen(job, ds), t_start, keep_missing, narrow=False)  # the new rows are in parts
    have = job.cached | set(job.parts)
    skip = job.unreadable.keys()
    rows = cache_rows(job.ds, job.digests, have, skip, job.cfg.data, job.old if keep_missing else None)
    if not job.narrowed:
        if not rows:
            raise FeatcacheError(
                f"{ds.source}: no readable images ({len(job.unreadable)} unreadable; see the list above)"
            )
        rows = augmented_views(job, rows)
    _tally(job, rows)

    attrs = cache_attrs(
        cfg,
        ds,
        job.key,
        job.fp,
        layer_dims,
        map_shapes,
        result.engine,
        old.meta if old is not None else None,
        dataset_identity(cfg, ds),
        result.engine_fidelity,
    )
    files = CacheFiles(
        job.final,
        ds.class_names,
        layer_dims,
        attrs,
        job.parts,
        cfg.extract.dtype,
        cfg.extract.compression,
        job.donors,
    )
    # a cache written before source identities is rewritten once, to record its source
    rewrite = old is None or "source_id" not in old.meta
    result.written = update_cache(files, old, rows, rewrite, added=rows if job.narrowed else None)
    clear_partial(job.final)
    result.seconds = time.perf_counter() - t_start
    return result


def _widen(job: ExtractJob, ds: Dataset) -> ExtractJob:
    """``job`` back on the whole dataset ``ds`` after a narrowed pass (whose new rows wait in parts)."""
    for c in job.donors:
        c.close()
    job.ds, job.narrowed, job.unreadable = ds, False, Unreadable(job.cfg.data.on_error)
    job.digests, job.cached, job.parts, job.pending, job.donors, job.donated = {}, set(), {}, [], [], set()
    return job


def _tally(job: ExtractJob, rows: list) -> None:
    """The result's counts: rows, splits and classes of the cache as it will be, what was skipped, removed
    and reused. ``rows``: every row, or after :func:`narrow_to_new` the new ones (the old ones all kept)."""
    result, old, ds = job.result, job.old, job.ds
    bad = job.unreadable.items
    split = np.asarray([r.split for r in rows], np.int64)
    labels = [r.label for r in rows]
    if job.narrowed:
        split = np.concatenate([old.split.astype(np.int64), split])
        labels = np.concatenate([old.labels, np.asarray(labels, np.int64)])
    result.rows = len(split)
    result.splits, result.class_rows = split_counts(split, labels, ds.class_names)
    if ds.multilabel:
        result.unlabelled = sum(1 for r in rows if not any(r.label))
    result.skipped = len(bad)
    result.reused = result.rows - result.extracted
    result.donated = sum(1 for r in rows if r.digest in job.donated)
    if old is not None and not job.narrowed:
        new_ids = {r.digest for r in rows}
        result.removed = len([d for d in old.ids if d not in new_ids])
    result.problems = [(s.key, reason) for s, _, reason in bad]
    result.quarantine = write_quarantine(quarantine_path(job.final), bad)


def _pending(job: ExtractJob) -> list[Sample]:
    """Samples whose content is in neither the cache nor an interrupted run's parts (once per digest).

    A file that failed before, unchanged, is not decoded again: it is unreadable again, with its old reason.
    """
    failed_before = read_quarantine(quarantine_path(job.final))
    pending, seen = [], set()
    for s in job.ds.samples:
        if s.key not in job.digests:
            continue
        d = job.digest(s)
        if d in job.cached or d in job.parts or d in seen:
            continue
        if d in failed_before:
            job.cannot_read(s, failed_before[d])
            continue
        seen.add(d)
        pending.append(s)
    return pending


def _run_pending(job: ExtractJob) -> tuple[dict[str, int], dict]:
    """Extract ``job.pending`` into parts (rescanned into ``job.parts``); return layer dims and map shapes."""
    if not job.pending:
        have = job.old if job.old is not None else next(iter(job.donors), None)
        if have is not None:
            dims = {layer: have.dataset(layer).shape[1] for layer in have.layers}
            return dims, have.meta.get("map_shapes", {})
        return part_dims(job.parts), {}
    dims, map_shapes = run_on_cluster(job) if job.cfg.cluster.address else _run_here(job)
    job.rescan_parts()
    return dims, map_shapes


def _run_here(job: ExtractJob) -> tuple[dict[str, int], dict]:
    """``job.pending`` through the backbone in this process."""
    from pipeline.data import area
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import configure_tf_threads

    area.prepare()
    configure_tf_threads(job.cfg.extract.threads)
    fm = job.model or build_feature_model(job.cfg.backbone, job.cfg.extract.precision)
    writer = job.part_writer(fm.dims)
    try:
        _run_backbone(job, fm, writer)
    except KeyboardInterrupt:
        raise FeatcacheError(
            f"interrupted: {writer.rows_written} new rows kept in {writer.dir}; run the same command again to resume"
        ) from None
    return fm.dims, fm.map_shapes


def _run_backbone(job: ExtractJob, fm, writer: PartWriter) -> None:
    """Batch after batch: the unreadable samples to ``job.unreadable``, the others' features to parts."""
    from pipeline.features.devices import engine_device, extraction_batch_size
    from pipeline.features.engines import make_engine

    x, pending, result = job.cfg.extract, job.pending, job.result
    dtype = np.dtype(x.dtype)
    given = "extract.batch_size" in given_keys(job.cfg)
    data = numpy_batches(
        job.ds,
        pending,
        fm.image_size,
        job.cfg.backbone.resize,
        extraction_batch_size(x.engine, fm.image_size, x.batch_size, given),
        decode=job.cfg.data.decode,
        threads=x.threads,
    )
    engine = make_engine(
        fm, x.engine, x.threads, x.cache_dir, images=len(pending), calibration=job.calibration
    )
    result.engine, result.engine_fidelity = engine.name, dict(getattr(engine, "fidelity", {}))
    result.engine_why = "; ".join(filter(None, [getattr(engine, "why", ""), dynamic_hint(fm.spec, x.engine)]))
    result.device = engine_device(engine)  # CPU, or the GPU's name
    with backbone_pass(job, len(pending)) as progress:
        bg = BackgroundWriter(writer)
        try:
            with frozen_gc():
                for idx, images, ok, why in data:
                    out = engine(images)
                    result.batches += 1
                    for i in np.flatnonzero(~ok):
                        job.cannot_read(pending[int(idx[i])], why[i].decode("utf-8", "replace"))
                    keep = np.flatnonzero(ok)
                    if len(keep):
                        ids = [job.digest(pending[int(idx[i])]) for i in keep]
                        bg.put(
                            ids, {layer: out[layer][keep].astype(dtype, copy=False) for layer in fm.layers}
                        )
                        result.extracted += len(keep)
                    progress.update(len(idx))
        finally:
            bg.close()
