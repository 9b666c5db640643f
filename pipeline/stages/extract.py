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
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.fingerprint import fingerprint
from pipeline.cache.locate import dataset_identity, open_donors, resolve_cache_path, touch_cache
from pipeline.cache.quarantine import Unreadable, quarantine_path, read_quarantine, write_quarantine
from pipeline.cache.schema import cache_attrs, part_manifest
from pipeline.cache.store import FeatureCache
from pipeline.cache.write import (
    BackgroundWriter,
    PartRows,
    PartWriter,
    Row,
    cache_rows,
    clear_partial,
    extraction_lock,
    part_dims,
    remove_stale_temps,
    same_rows,
    scan_parts,
    write_cache,
)
from pipeline.data.augment import VIEW_SUFFIX, augmented_view
from pipeline.data.images import make_image_dataset, numpy_batches
from pipeline.data.sources import Dataset, Sample, content_digests, digest_bytes, load_dataset
from pipeline.data.splits import SPLIT_CODES, split_counts, split_lines
from pipeline.features.backbones.hub_presets import settle
from pipeline.features.backbones.registry import check_engine, dynamic_hint, get_spec
from pipeline.features.calibration import Calibration, for_config
from pipeline.utils.collector import frozen_gc
from pipeline.utils.config import Config, given_keys, resolve_config
from pipeline.utils.errors import FeatcacheError


@dataclass
class ExtractResult:
    path: Path
    rows: int = 0  # samples in the cache now
    extracted: int = 0  # ran through the backbone in this run
    reused: int = 0  # served from the previous cache or from parts of an interrupted run
    donated: int = 0  # of those, copied by content from another cache of the same features (``donors``)
    donors: list[Path] = field(default_factory=list)  # the other caches rows were copied from
    skipped: int = 0  # unreadable, listed in the quarantine file
    removed: int = 0  # were cached, no longer in the dataset
    ignored: int = 0  # non-image or hidden files seen while scanning
    batches: int = 0  # backbone forward passes
    engine: str = ""  # which runtime ran the backbone in this run (empty: none ran)
    engine_why: str = ""  # why ``auto`` chose it, when it says; a transformer's hint at tflite-dynamic
    engine_fidelity: dict[str, Any] = field(default_factory=dict)  # tflite-dynamic: its gate's figures
    seconds: float = 0.0
    backbone_seconds: float = 0.0
    quarantine: Path | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: int = 0  # multi-label rows with no class (all negative)
    device: str = ""  # where the backbone ran in this run: "CPU" or "GPU (its name)" (empty: none ran)
    splits: dict[str, int] = field(default_factory=dict)  # rows in the cache now: train, val, test
    class_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # split → class → rows (positives)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.backbone_seconds if self.backbone_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"cache: {self.path}",
            f"samples: {self.rows} in cache · {self.extracted} extracted · {self.reused} reused · "
            f"{self.skipped} skipped · {self.removed} removed"
            + (f" · {self.ignored} non-image files ignored" if self.ignored else "")
            + (f" · {self.unlabelled} with no label" if self.unlabelled else ""),
        ]
        if self.donated:
            lines.append(
                f"reused by content: {self.donated} rows from {', '.join(p.name for p in self.donors)}"
                " (the same images, seen in another source's cache)"
            )
        if self.extracted:
            lines.append(
                f"speed: {self.images_per_second:.1f} images/s on {self.engine or '?'} "
                f"({self.device or '?'}, {self.batches} batches, {self.seconds:.1f} s total)"
                + (f"\n  ({self.engine_why})" if self.engine_why else "")
            )
        else:
            lines.append(f"no backbone work ({self.seconds:.2f} s)")
        lines += split_lines(self.splits, self.class_rows)
        lines += [f"skipped files and reasons: {self.quarantine}"] if self.quarantine else []
        return "\n".join(lines)


@dataclass
class ExtractJob:
    """One run of :func:`extract`, handed from step to step: what is extracted into which cache, and what the
    steps found so far (digests, parts, what the backbone still has to see, what could not be read)."""

    cfg: Config
    ds: Dataset
    final: Path  # the complete cache file this run brings up to date
    key: dict[str, Any]  # the feature key; ``fp`` is its fingerprint
    fp: str
    old: FeatureCache | None  # the previous complete cache (None: there is none, or --rebuild)
    result: ExtractResult
    unreadable: Unreadable
    calibration: Calibration | None = None  # tflite-int8: calibrated on it; tflite-dynamic: gated on it
    bar: Any = None  # a progress bar shared with other extractions (compare's), else one of its own
    model: Any = None  # a FeatureModel built for ``cfg`` already (compare's check), else built here
    #: sample key → (content digest, size, mtime)
    digests: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)  # digests the previous cache holds
    parts: dict[str, PartRows] = field(default_factory=dict)  # digests in an interrupted run's parts
    pending: list[Sample] = field(default_factory=list)  # samples the backbone has to see in this run
    donors: list[FeatureCache] = field(default_factory=list)  # other caches of ``fp`` that serve rows
    share: bool = True  # rows may come from ``donors`` (not with --rebuild)
    donated: set[str] = field(default_factory=set)  # digests served by ``donors``

    def digest(self, s: Sample) -> str:
        return self.digests[s.key][0]

    def cannot_read(self, s: Sample, reason: str) -> None:
        self.unreadable.add(s, self.digest(s), reason)

    def part_writer(self, dims: dict[str, int]) -> PartWriter:
        return PartWriter(self.final, part_manifest(self.fp, self.key, self.ds, dims))

    def rescan_parts(self) -> None:
        self.parts = scan_parts(self.final, self.fp)


@contextlib.contextmanager
def _backbone_pass(job: ExtractJob, total: int):
    """A progress bar over ``total`` images; the time the pass takes counts as backbone time."""
    from tqdm import tqdm

    enabled = job.cfg.extract.progress
    progress = job.bar or tqdm(
        total=total, unit="img", desc="extract", disable=not enabled, dynamic_ncols=True, smoothing=0.1
    )
    t0 = time.perf_counter()
    try:
        yield progress
    finally:
        if progress is not job.bar:
            progress.close()
        job.result.backbone_seconds += time.perf_counter() - t0


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


def _update(job: ExtractJob, t_start: float, keep_missing: bool) -> ExtractResult:
    """Digest the samples, run the backbone on those not cached yet, and write the new cache if it changed."""
    cfg, ds, old, result = job.cfg, job.ds, job.old, job.result
    if old is not None:
        job.cached = set(old.ids)
    job.digests, found = content_digests(ds, old.file_stats() if old is not None else {})
    job.unreadable.extend(found)  # with ``fail``, the first one stops the run here
    job.parts = scan_parts(job.final, job.fp)
    job.pending = _pending(job)
    if job.pending and job.share:  # rows of the same content in other caches of these features
        wanted = {job.digest(s) for s in job.pending}
        job.donors, job.donated = open_donors(job.final, job.fp, wanted - job.cached - set(job.parts))
        job.result.donors = [c.path for c in job.donors]
        job.cached |= job.donated
        job.pending = [s for s in job.pending if job.digest(s) not in job.donated]
    try:
        layer_dims, map_shapes = _run_pending(job)
    finally:
        ds.close()  # shard readers: their streams end with this pass
    have = job.cached | set(job.parts)
    skip = job.unreadable.keys()
    rows = cache_rows(job.ds, job.digests, have, skip, job.cfg.data, job.old if keep_missing else None)
    if not rows:
        raise FeatcacheError(
            f"{ds.source}: no readable images ({len(job.unreadable)} unreadable; see the list above)"
        )
    rows = _augmented_views(job, rows)

    bad = job.unreadable.items
    result.rows = len(rows)
    result.splits, result.class_rows = split_counts(rows, ds.class_names)
    if ds.multilabel:
        result.unlabelled = sum(1 for r in rows if not any(r.label))
    result.skipped = len(bad)
    result.reused = len(rows) - result.extracted
    result.donated = sum(1 for r in rows if r.digest in job.donated)
    new_ids = {r.digest for r in rows}
    result.removed = len([d for d in (old.ids if old is not None else []) if d not in new_ids])
    result.problems = [(s.key, reason) for s, _, reason in bad]
    result.quarantine = write_quarantine(quarantine_path(job.final), bad)

    up_to_date = old is not None and "source_id" in old.meta  # else: an earlier version's, recorded once
    if not (up_to_date and not job.pending and same_rows(old, rows, ds.class_names)):
        old_meta = old.meta if old is not None else None
        identity = dataset_identity(cfg, ds)
        attrs = cache_attrs(
            cfg,
            ds,
            job.key,
            job.fp,
            layer_dims,
            map_shapes,
            result.engine,
            old_meta,
            identity,
            result.engine_fidelity,
        )
        write_cache(
            job.final,
            rows,
            ds.class_names,
            layer_dims,
            attrs,
            old,
            job.parts,
            cfg.extract.dtype,
            cfg.extract.compression,
            donors=job.donors,
        )
        if old is not None:
            old.close()
    clear_partial(job.final)
    result.seconds = time.perf_counter() - t_start
    return result


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
    dims, map_shapes = _run_on_cluster(job) if job.cfg.cluster.address else _run_here(job)
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
    with _backbone_pass(job, len(pending)) as progress:
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


def _run_on_cluster(job: ExtractJob) -> tuple[dict[str, int], dict]:
    """``job.pending`` as deterministic shards on the Dask cluster ``[cluster] address`` names, one task each.

    The driver is the one writer: each shard's features come back and become parts here, as they arrive,
    exactly like a local run's batches; a rerun after any interruption resumes from those parts. A worker
    lost mid-task has its task rerun elsewhere by Dask; its result is written once, when it arrives.
    """
    from pipeline.features.distributed import ShardSettings, run_shards
    from pipeline.utils.cluster import cluster_client

    cfg, x = job.cfg, job.cfg.extract
    with cluster_client(cfg.cluster.address, quiet=not x.progress) as client:
        settings = ShardSettings.make(
            cfg.backbone,
            x.engine,
            x.threads,
            x.cache_dir,
            x.batch_size,
            x.dtype,
            len(job.pending),
            cfg.data.decode,
            cfg.cluster.address,
            precision=x.precision,
            batch_given="extract.batch_size" in given_keys(cfg),
        )
        resume = "finished shards are kept, run the same command again to resume"
        writer: PartWriter | None = None  # made at the first result: it knows the layer dims
        shards = run_shards(
            client, settings, job.ds, job.pending, cfg.cluster.address, resume, calibration=job.calibration
        )
        with _backbone_pass(job, len(job.pending)) as progress:
            try:
                with contextlib.closing(shards):  # unfinished tasks are cancelled before the client closes
                    for _, samples, r in shards:
                        for pos, reason in r.bad:  # before any part: a failing run leaves no partial folder
                            job.cannot_read(samples[pos], reason)
                        if writer is None:
                            writer, dims, map_shapes = job.part_writer(r.dims), r.dims, r.map_shapes
                            job.result.engine, job.result.device = r.engine, r.device
                            job.result.engine_fidelity = r.fidelity
                        _write_shard(job, writer, samples, r)
                        progress.update(r.size)
            except KeyboardInterrupt:
                done = writer.rows_written if writer else 0
                raise FeatcacheError(
                    f"interrupted: {done} new rows kept in parts; run the same command again to resume"
                ) from None
    return dims, map_shapes


def _write_shard(job: ExtractJob, writer: PartWriter, samples: list[Sample], r) -> None:
    """One shard's features as parts (batch-sized, as a local run writes them), and the run's counts."""
    step = job.cfg.extract.batch_size
    for start in range(0, len(r.ids), step):
        ids = [job.digest(samples[i]) for i in r.ids[start : start + step]]
        writer.write(ids, {layer: f[start : start + step] for layer, f in r.features.items()})
    job.result.extracted += len(r.ids)
    job.result.batches += r.batches


def _augmented_views(job: ExtractJob, rows: list[Row]) -> list[Row]:
    """``rows`` plus the view rows of every train row; views not cached yet run through the backbone now."""
    spec = job.key.get("augment_views")
    if not spec:
        return rows
    import hashlib
    import json

    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    by_key = {s.key: s for s in job.ds.samples}
    have = {r.key for r in rows}
    views: list[tuple[Row, Sample, int]] = []
    for r in rows:
        if r.split != SPLIT_CODES["train"] or VIEW_SUFFIX in r.key or r.key not in by_key:
            continue
        for v in range(1, spec["k"] + 1):
            vkey = f"{r.key}{VIEW_SUFFIX}{v}"
            if vkey not in have:
                vid = digest_bytes(f"{r.digest}:view{v}:{tag}".encode())
                views.append((Row(vkey, vid, r.label, r.split, r.size, r.mtime), by_key[r.key], v))
    todo = [x for x in views if x[0].digest not in job.cached and x[0].digest not in job.parts]
    if todo:
        _extract_views(job, todo, spec)
        job.rescan_parts()
    kept = [row for row, _, _ in views if row.digest in job.cached or row.digest in job.parts]
    return rows + kept


def _extract_views(job: ExtractJob, todo: list[tuple[Row, Sample, int]], spec) -> None:
    """The views in ``todo`` through the augmentation and the backbone into parts. Their images were read as
    train rows already; one that cannot be read now is left out, and its view row with it."""
    from pipeline.data.augment import augmentation_layers
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import configure_tf_threads, make_engine

    cfg, result = job.cfg, job.result
    configure_tf_threads(cfg.extract.threads)
    fm = job.model or build_feature_model(cfg.backbone, cfg.extract.precision)
    layers = augmentation_layers(spec["augment"])
    writer = job.part_writer(fm.dims)
    x = cfg.extract
    engine = make_engine(fm, x.engine, x.threads, x.cache_dir, calibration=job.calibration)
    samples = [s for _, s, _ in todo]
    data = make_image_dataset(
        job.ds, samples, fm.image_size, cfg.backbone.resize, cfg.extract.batch_size, decode=cfg.data.decode
    )
    dtype = np.dtype(cfg.extract.dtype)
    with _backbone_pass(job, len(todo)) as progress:
        try:
            for idx, images, ok, _ in data:
                idx, ok, x = idx.numpy(), np.reshape(ok.numpy(), -1), images.numpy()
                keep = np.flatnonzero(ok)
                if len(keep):
                    views = [(x[i], *todo[int(idx[i])]) for i in keep]  # (image, view row, sample, view)
                    batch = [augmented_view(layers, im, row.digest, v) for im, row, _, v in views]
                    out = engine(np.stack(batch))
                    ids = [row.digest for _, row, _, _ in views]
                    writer.write(ids, {layer: out[layer].astype(dtype, copy=False) for layer in fm.layers})
                    result.extracted += len(keep)
                    result.batches += 1
                progress.update(len(idx))
        except KeyboardInterrupt:
            raise FeatcacheError(
                f"interrupted: {writer.rows_written} augmented views kept in {writer.dir}; run the same command again to resume"
            ) from None
