"""Stage 1: run the frozen backbone once over a dataset and cache the features.

    sources → digests → what is missing? → tf.data (parallel decode, shared resize, batch, prefetch)
            → compiled ``model(x, training=False)`` → parts on disk (a writer thread) → complete HDF5

Only samples whose content digest is not cached yet reach the backbone, so a rerun with nothing changed
does no backbone work (and never imports TensorFlow), adding N images extracts only those N, and an
interrupted run resumes from its last written batch.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.fingerprint import fingerprint
from pipeline.cache.locate import resolve_cache_path, touch_cache
from pipeline.cache.quarantine import quarantine_path, read_quarantine, write_quarantine
from pipeline.cache.store import FeatureCache
from pipeline.cache.write import (
    PartWriter,
    Row,
    clear_partial,
    remove_stale_temps,
    scan_parts,
    write_cache,
)
from pipeline.data.augment import VIEW_SUFFIX
from pipeline.data.images import make_image_dataset, numpy_batches
from pipeline.data.sources import Dataset, Sample, digest_bytes
from pipeline.data.splits import SPLIT_CODES, assign_split
from pipeline.data.storage import is_url
from pipeline.features.backbones.registry import get_spec
from pipeline.utils.collector import frozen_gc
from pipeline.utils.config import Config, load_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import file_lock


@dataclass
class ExtractResult:
    path: Path
    rows: int = 0  # samples in the cache now
    extracted: int = 0  # ran through the backbone in this run
    reused: int = 0  # served from the previous cache or from parts of an interrupted run
    skipped: int = 0  # unreadable, listed in the quarantine file
    removed: int = 0  # were cached, no longer in the dataset
    ignored: int = 0  # non-image or hidden files seen while scanning
    batches: int = 0  # backbone forward passes
    engine: str = ""  # which runtime ran the backbone in this run (empty: none ran)
    engine_why: str = ""  # why ``auto`` chose it, when it says
    seconds: float = 0.0
    backbone_seconds: float = 0.0
    quarantine: Path | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.backbone_seconds if self.backbone_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"cache: {self.path}",
            f"samples: {self.rows} in cache · {self.extracted} extracted · {self.reused} reused · "
            f"{self.skipped} skipped · {self.removed} removed"
            + (f" · {self.ignored} non-image files ignored" if self.ignored else ""),
        ]
        if self.extracted:
            lines.append(
                f"speed: {self.images_per_second:.1f} images/s on {self.engine or '?'} "
                f"({self.batches} batches, {self.seconds:.1f} s total)"
                + (f"\n  ({self.engine_why})" if self.engine_why else "")
            )
        else:
            lines.append(f"no backbone work ({self.seconds:.2f} s)")
        if self.quarantine:
            lines.append(f"skipped files and reasons: {self.quarantine}")
        return "\n".join(lines)


def _where(s: Sample) -> str:
    """How an error names a sample: its file, or its key when it lives inside a shard or an array."""
    return s.key if (s.member or s.index >= 0 or s.digest or not s.label) else (s.path or s.key)


def _stat(s: Sample) -> tuple[int, int]:
    if s.stamp is not None:
        return s.stamp
    if s.path is None or s.member or s.index >= 0 or is_url(s.path):
        return -1, -1
    st = os.stat(s.path)
    return st.st_size, st.st_mtime_ns


def _digests(ds: Dataset, known: dict[str, tuple[int, int, str]]):
    """Content digest of every sample; files whose size and mtime match the cache are not re-read, shard
    members come with the digest their listing computed, samples the listing found unusable are ``bad``."""
    from pipeline.data.decode import DecodeError, os_error_reason

    out: dict[str, tuple[str, int, int]] = {}
    bad: list[tuple[Sample, str, str]] = [(s, "", reason) for s, reason in ds.problems]
    for s in ds.samples:
        if ds.arrays is not None:
            a = ds.arrays[s.index]
            out[s.key] = (digest_bytes(a.tobytes() + repr(a.shape).encode()), -1, -1)
            continue
        if s.digest:
            out[s.key] = (s.digest, -1, -1)
            continue
        try:
            size, mtime = _stat(s)
            hit = known.get(s.key)
            if hit and size >= 0 and hit[0] == size and hit[1] == mtime:
                out[s.key] = (hit[2], size, mtime)
                continue
            out[s.key] = (digest_bytes(ds.read(s)), size, mtime)
        except DecodeError as e:
            bad.append((s, "", str(e)))
        except OSError as e:
            bad.append((s, "", os_error_reason(e) if e.errno else str(e)))
    return out, bad


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("featcache", "tensorflow", "keras", "h5py", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def _cache_lock(final: Path, timeout: float, quiet: bool):
    """One run per cache: a second one waits (saying so) or gives up with a clear message."""
    return file_lock(
        str(final) + ".lock",
        f"{final}: another featcache run is extracting into this cache; try again when it finishes",
        timeout=timeout,
        waiting=None if quiet else f"waiting for another featcache run on {final} ...",
        timed_out=f"{final}: still locked by another run after {timeout:.0f} s",
    )


class _BackgroundWriter:
    """Writes parts on a thread so HDF5/npz I/O overlaps the next forward pass."""

    def __init__(self, writer: PartWriter):
        self.writer, self.error = writer, None
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    self.error = e

    def put(self, ids, features):
        if self.error:
            raise self.error
        self.q.put((ids, features))

    def close(self):
        self.q.put(None)
        self.t.join()
        if self.error:
            raise self.error


def _run_backbone(
    fm,
    ds: Dataset,
    pending: list[Sample],
    digests,
    cfg: Config,
    writer: PartWriter,
    result: ExtractResult,
    bad,
):

    from pipeline.features.engines import make_engine

    dtype = np.dtype(cfg.extract.dtype)
    data = numpy_batches(
        ds,
        pending,
        fm.image_size,
        cfg.backbone.resize,
        cfg.extract.batch_size,
        decode=cfg.data.decode,
        threads=cfg.extract.threads,
    )
    engine = make_engine(
        fm, cfg.extract.engine, cfg.extract.threads, cfg.extract.cache_dir, images=len(pending)
    )
    result.engine, result.engine_why = engine.name, getattr(engine, "why", "")
    progress = _progress(len(pending), cfg.extract.progress)
    bg = _BackgroundWriter(writer)
    t0 = time.perf_counter()
    try:
        with frozen_gc():
            for idx, images, ok, why in data:
                out = engine(images)
                result.batches += 1
                for i in np.flatnonzero(~ok):
                    s = pending[int(idx[i])]
                    reason = why[i].decode("utf-8", "replace")
                    if cfg.data.on_error == "fail":
                        raise FeatcacheError(f"cannot read {_where(s)}: {reason}")
                    bad.append((s, digests[s.key][0], reason))
                keep = np.flatnonzero(ok)
                if len(keep):
                    ids = [digests[pending[int(idx[i])].key][0] for i in keep]
                    bg.put(ids, {layer: out[layer][keep].astype(dtype, copy=False) for layer in fm.layers})
                    result.extracted += len(keep)
                progress.update(len(idx))
    finally:
        try:
            bg.close()
        finally:
            progress.close()
            result.backbone_seconds = time.perf_counter() - t0


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="img", desc="extract", disable=not enabled, dynamic_ncols=True, smoothing=0.1
    )


def extract(
    config: Config | str | Path | None = None,
    *,
    rebuild: bool = False,
    dataset: Dataset | None = None,
    keep_missing: bool = False,
    **overrides: Any,
) -> ExtractResult:
    """Bring the cache for ``config`` up to date and return what was done.

    ``config`` is a :class:`Config`, a TOML path or None (defaults); ``overrides`` use dotted keys with
    ``.`` written as ``__`` (``extract(data__source="photos/", backbone__name="vgg16")``). ``dataset``
    replaces ``[data]``'s source; ``keep_missing`` keeps cached rows that are not in it (an accumulating
    cache, as the scikit-learn transformer uses) instead of dropping them.
    """
    t_start = time.perf_counter()
    if not isinstance(config, Config):
        config = load_config(config, {k.replace("__", "."): v for k, v in overrides.items()})
    elif overrides:
        raise TypeError("pass overrides either in the Config or as keywords, not both")
    cfg = config
    get_spec(cfg.backbone.name)  # an unknown backbone fails before any work
    cache_dir = Path(cfg.extract.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatcacheError(f"cache_dir {cache_dir}: cannot create ({e.strerror})") from None
    if not os.access(cache_dir, os.W_OK):
        raise FeatcacheError(f"cache_dir {cache_dir}: not writable")

    final, key, ds = resolve_cache_path(cfg, dataset)
    fp = fingerprint(key)
    result = ExtractResult(final, ignored=len(ds.ignored))
    quiet = not cfg.extract.progress
    with _cache_lock(final, cfg.extract.lock_timeout, quiet):
        remove_stale_temps(final)
        old: FeatureCache | None = None
        if final.exists() and not rebuild:
            old = FeatureCache(final)  # a damaged file raises, naming --rebuild
            if old.fingerprint != fp:  # pragma: no cover - the name embeds the fingerprint
                old.close()
                old = None
        if rebuild:
            clear_partial(final)
        try:
            done = _update(cfg, ds, final, key, fp, old, result, t_start, keep_missing)
            touch_cache(final)  # the cache just made is the newest: later stages follow it
            return done
        finally:
            if old is not None:
                old.close()


def _update(
    cfg: Config,
    ds: Dataset,
    final: Path,
    key,
    fp: str,
    old,
    result: ExtractResult,
    t_start: float,
    keep_missing: bool,
):
    """Digest the samples, run the backbone on those not cached yet, and write the new cache if it changed."""
    known = {}
    if old is not None:
        known = {
            k: (int(s), int(m), d)
            for k, s, m, d in zip(old.keys, old.sizes, old.mtimes, old.ids, strict=True)
        }
    digests, bad = _digests(ds, known)
    if bad and cfg.data.on_error == "fail":
        s, _, reason = bad[0]
        raise FeatcacheError(f"cannot read {_where(s)}: {reason}")
    cached = set(old.ids) if old is not None else set()
    parts = scan_parts(final, fp)
    pending = _pending(cfg, ds, final, digests, cached, parts, bad)
    try:
        layer_dims, map_shapes, parts = _run_pending(
            cfg, ds, final, key, fp, old, pending, digests, parts, result, bad
        )
    finally:
        ds.close()  # shard readers: their streams end with this pass
    rows = _rows(cfg, ds, digests, bad, cached, parts, old if keep_missing else None)
    if not rows:
        raise FeatcacheError(f"{ds.source}: no readable images ({len(bad)} unreadable; see the list above)")
    rows, parts = _augmented_views(cfg, ds, final, fp, key, rows, old, parts, result)

    result.rows = len(rows)
    result.skipped = len(bad)
    result.reused = len(rows) - result.extracted
    new_ids = {r.digest for r in rows}
    result.removed = len([d for d in (old.ids if old is not None else []) if d not in new_ids])
    result.problems = [(s.key, reason) for s, _, reason in bad]
    result.quarantine = write_quarantine(quarantine_path(final), bad)

    if not (old is not None and not pending and _same_rows(old, rows, ds.class_names)):
        attrs = _cache_attrs(cfg, ds, key, fp, layer_dims, map_shapes, old, result)
        write_cache(
            final,
            rows,
            ds.class_names,
            layer_dims,
            attrs,
            old,
            parts,
            cfg.extract.dtype,
            cfg.extract.compression,
        )
        if old is not None:
            old.close()
    clear_partial(final)
    result.seconds = time.perf_counter() - t_start
    return result


def _pending(cfg: Config, ds: Dataset, final: Path, digests, cached: set, parts, bad: list) -> list[Sample]:
    """Samples whose content is in neither the cache nor an interrupted run's parts (once per digest).

    A file that failed before, unchanged, is not decoded again: it joins ``bad`` with its old reason.
    """
    failed_before = read_quarantine(quarantine_path(final))
    pending, seen = [], set()
    for s in ds.samples:
        if s.key not in digests:
            continue
        d = digests[s.key][0]
        if d in cached or d in parts or d in seen:
            continue
        if d in failed_before:
            if cfg.data.on_error == "fail":
                raise FeatcacheError(f"cannot read {_where(s)}: {failed_before[d]}")
            bad.append((s, d, failed_before[d]))
            continue
        seen.add(d)
        pending.append(s)
    return pending


def _run_pending(
    cfg: Config, ds: Dataset, final: Path, key, fp: str, old, pending, digests, parts, result, bad
):
    """Extract ``pending`` into parts; return the layer dims, map shapes and the parts now on disk."""
    if not pending:
        if old is not None:
            dims = {layer: old.dataset(layer).shape[1] for layer in old.layers}
            return dims, old.meta.get("map_shapes", {}), parts
        return (*_dims_from_parts(parts), parts)
    if cfg.cluster.address:
        dims, map_shapes = _run_on_cluster(cfg, ds, final, key, fp, pending, digests, result, bad)
        return dims, map_shapes, scan_parts(final, fp)
    from pipeline.data import area
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import configure_tf_threads

    area.prepare()
    configure_tf_threads(cfg.extract.threads)
    fm = build_feature_model(cfg.backbone)
    writer = PartWriter(final, _part_manifest(fp, key, ds, fm.dims))
    try:
        _run_backbone(fm, ds, pending, digests, cfg, writer, result, bad)
    except KeyboardInterrupt:
        raise FeatcacheError(
            f"interrupted: {writer.rows_written} new rows kept in {writer.dir}; run the same command again to resume"
        ) from None
    return fm.dims, fm.map_shapes, scan_parts(final, fp)


def _part_manifest(fp: str, key, ds: Dataset, dims: dict[str, int]) -> dict[str, Any]:
    return {
        "fingerprint": fp,
        "feature_key": key,
        "backbone": key["backbone"],
        "dataset": ds.name,
        "layers": dims,
    }


def _run_on_cluster(cfg: Config, ds: Dataset, final: Path, key, fp: str, pending, digests, result, bad):
    """``pending`` as deterministic shards on the Dask cluster ``[cluster] address`` names, one task each.

    The driver is the one writer: each shard's features come back and become parts here, as they arrive,
    exactly like a local run's batches; a rerun after any interruption resumes from those parts. A worker
    lost mid-task has its task rerun elsewhere by Dask; its result is written once, when it arrives.
    """
    from pipeline.features.distributed import ShardSettings, run_shards
    from pipeline.utils.cluster import cluster_client

    x = cfg.extract
    with cluster_client(cfg.cluster.address, quiet=not x.progress) as client:
        settings = ShardSettings.make(
            cfg.backbone,
            x.engine,
            x.threads,
            x.cache_dir,
            x.batch_size,
            x.dtype,
            len(pending),
            cfg.data.decode,
            cfg.cluster.address,
        )
        resume = "finished shards are kept, run the same command again to resume"
        progress = _progress(len(pending), x.progress)
        state: dict[str, Any] = {"writer": None}
        t0 = time.perf_counter()
        shards = run_shards(client, settings, ds, pending, cfg.cluster.address, resume)
        try:
            with contextlib.closing(shards):  # unfinished tasks are cancelled before the client closes
                for _, samples, r in shards:
                    _take_shard(r, samples, cfg, ds, fp, key, final, digests, result, bad, state)
                    progress.update(r.size)
        except KeyboardInterrupt:
            done = state["writer"].rows_written if state["writer"] else 0
            raise FeatcacheError(
                f"interrupted: {done} new rows kept in parts; run the same command again to resume"
            ) from None
        finally:
            progress.close()
            result.backbone_seconds = time.perf_counter() - t0
    return state["dims"], state["map_shapes"]


def _take_shard(r, samples, cfg: Config, ds: Dataset, fp: str, key, final: Path, digests, result, bad, state):
    """One shard's result into parts (batch-sized, as a local run writes them) and the run's counts."""
    for pos, reason in r.bad:
        s = samples[pos]
        if cfg.data.on_error == "fail":
            raise FeatcacheError(f"cannot read {s.path or s.key}: {reason}")
        bad.append((s, digests[s.key][0], reason))
    if state["writer"] is None:
        state.update(writer=PartWriter(final, _part_manifest(fp, key, ds, r.dims)), dims=r.dims)
        state["map_shapes"] = r.map_shapes
        result.engine = r.engine
    step = cfg.extract.batch_size
    for start in range(0, len(r.ids), step):
        ids = [digests[samples[i].key][0] for i in r.ids[start : start + step]]
        state["writer"].write(ids, {layer: f[start : start + step] for layer, f in r.features.items()})
    result.extracted += len(r.ids)
    result.batches += r.batches


def _rows(cfg: Config, ds: Dataset, digests, bad, cached: set, parts, keep_from) -> list[Row]:
    """The new cache's rows in dataset order, each with its content-hashed split; plus, with ``keep_from``
    (an accumulating cache), the rows of the old cache that are no longer in the dataset."""
    bad_keys = {s.key for s, _, _ in bad}
    label_of = ds.label_index()
    rows: list[Row] = []
    added: set[str] = set()
    for s in ds.samples:
        if s.key in bad_keys or s.key not in digests or s.key in added:
            continue
        added.add(s.key)
        d, size, mtime = digests[s.key]
        if d not in cached and d not in parts:
            continue  # failed during decode in this run (already in ``bad``)
        split = assign_split(
            d,
            fixed=s.split,
            group=s.group,
            val_fraction=cfg.data.val_fraction,
            test_fraction=cfg.data.test_fraction,
        )
        rows.append(Row(s.key, d, label_of[s.label], SPLIT_CODES[split], size, mtime))
    if keep_from is not None:
        old, current = keep_from, {r.key for r in rows}
        rows += [
            Row(k, old.ids[i], int(old.labels[i]), int(old.split[i]), int(old.sizes[i]), int(old.mtimes[i]))
            for i, k in enumerate(old.keys)
            if k not in current
        ]
    return rows


def _cache_attrs(
    cfg: Config, ds: Dataset, key, fp: str, layer_dims, map_shapes, old, result
) -> dict[str, Any]:
    """The cache file's metadata: what made the features, from what, with which versions."""
    b = cfg.backbone
    return {
        "fingerprint": fp,
        "feature_key": key,
        "backbone": key["backbone"],
        "weights": b.weights,
        "weights_digest": key["weights_digest"],
        "layers": list(layer_dims),
        "map_shapes": map_shapes,
        "pooling": b.pooling,
        "image_size": key["image_size"],
        "resize": b.resize,
        "decode": cfg.data.decode,
        "preprocess": key["preprocess"],
        "dtype": cfg.extract.dtype,
        "engine": result.engine
        or (old.meta.get("engine", "tensorflow") if old is not None else "tensorflow"),
        "dataset": ds.name,
        "source": ds.source
        if is_url(ds.source) or not (ds.is_files or Path(ds.source).exists())
        else os.path.abspath(ds.source),
        "versions": _versions(),
        "config": {
            "data": cfg.to_dict()["data"],
            "backbone": vars(cfg.backbone),
            "extract": vars(cfg.extract),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _dims_from_parts(parts) -> tuple[dict[str, int], dict]:
    """Layer dims when every row comes from an interrupted run's parts and no model was built."""
    first = next(iter(parts.values()), None)
    if first is None:
        return {}, {}
    with np.load(first.part) as z:
        layers = [str(x) for x in z["layers"]]
        return {name: int(z[f"f_{i}"].shape[1]) for i, name in enumerate(layers)}, {}


def _same_rows(old: FeatureCache, rows: list[Row], class_names: list[str]) -> bool:
    return (
        old.class_names == class_names
        and old.keys == [r.key for r in rows]
        and old.ids == [r.digest for r in rows]
        and np.array_equal(old.labels, [r.label for r in rows])
        and np.array_equal(old.split, [r.split for r in rows])
    )


def _augmented_views(
    cfg: Config, ds: Dataset, final: Path, fp: str, key, rows: list[Row], old, parts, result
):
    """``rows`` plus the view rows of every train row; views not cached yet run through the backbone now."""
    spec = key.get("augment_views")
    if not spec:
        return rows, parts
    import hashlib
    import json

    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    by_key = {s.key: s for s in ds.samples}
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
    cached = set(old.ids) if old is not None else set()
    todo = [x for x in views if x[0].digest not in cached and x[0].digest not in parts]
    if todo:
        _extract_views(cfg, ds, final, fp, key, todo, spec, result)
        parts = scan_parts(final, fp)
    kept = [row for row, _, _ in views if row.digest in cached or row.digest in parts]
    return rows + kept, parts


def _extract_views(cfg: Config, ds: Dataset, final: Path, fp: str, key, todo, spec, result) -> None:
    from pipeline.data.augment import augmentation_layers
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import configure_tf_threads, make_engine

    configure_tf_threads(cfg.extract.threads)
    fm = build_feature_model(cfg.backbone)
    layers = augmentation_layers(spec["augment"])
    writer = PartWriter(final, _part_manifest(fp, key, ds, fm.dims))
    engine = make_engine(fm, cfg.extract.engine, cfg.extract.threads, cfg.extract.cache_dir)
    samples = [s for _, s, _ in todo]
    data = make_image_dataset(
        ds, samples, fm.image_size, cfg.backbone.resize, cfg.extract.batch_size, decode=cfg.data.decode
    )
    dtype = np.dtype(cfg.extract.dtype)
    progress = _progress(len(todo), cfg.extract.progress)
    t0 = time.perf_counter()
    try:
        for idx, images, ok, _ in data:
            idx, ok, x = idx.numpy(), np.reshape(ok.numpy(), -1), images.numpy()
            keep = np.flatnonzero(ok)
            if len(keep):
                batch = np.stack([_augment_one(layers, x[i], todo[int(idx[i])]) for i in keep])
                out = engine(batch)
                ids = [todo[int(idx[i])][0].digest for i in keep]
                writer.write(ids, {layer: out[layer].astype(dtype, copy=False) for layer in fm.layers})
                result.extracted += len(keep)
                result.batches += 1
            progress.update(len(idx))
    except KeyboardInterrupt:
        raise FeatcacheError(
            f"interrupted: {writer.rows_written} augmented views kept in {writer.dir}; run the same command again to resume"
        ) from None
    finally:
        progress.close()
        result.backbone_seconds += time.perf_counter() - t0


def _augment_one(layers, image: np.ndarray, item) -> np.ndarray:
    """One view, the same whatever the batch: every random draw is seeded by (image digest, view)."""
    row, _, v = item
    seed = int(row.digest[:8], 16)
    x = image[None]
    for j, layer in enumerate(layers):
        t = layer.get_random_transformation(x, training=True, seed=(seed + 7919 * j + v) & 0x7FFFFFFF)
        x = layer.transform_images(x, t, training=True)
    return np.asarray(x[0], np.float32)
