"""Stage 1: run the frozen backbone once over a dataset and cache the features.

    sources → digests → what is missing? → tf.data (parallel decode, shared resize, batch, prefetch)
            → compiled ``model(x, training=False)`` → parts on disk (a writer thread) → complete HDF5

Only samples whose content digest is not cached yet reach the backbone, so a rerun with nothing changed
does no backbone work (and never imports TensorFlow), adding N images extracts only those N, and an
interrupted run resumes from its last written batch.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones.registry import get_spec
from .config import Config, load_config
from .errors import FeatcacheError
from .fingerprint import feature_key, fingerprint, remember_weights_digest, weights_digest
from .sources import Dataset, Sample, digest_bytes, load_dataset
from .splits import SPLIT_CODES, assign_split
from .store import (
    FeatureCache,
    PartWriter,
    Row,
    cache_stem,
    clear_partial,
    quarantine_path,
    remove_stale_temps,
    scan_parts,
    write_cache,
    write_error,
)


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
            )
        else:
            lines.append(f"no backbone work ({self.seconds:.2f} s)")
        if self.quarantine:
            lines.append(f"skipped files and reasons: {self.quarantine}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- helpers


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """Array samples (gray, gray+1, RGB, RGBA) → H×W×3 uint8, alpha over white like decoded files."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        return np.rint(a[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return a


def _stat(path: str | None) -> tuple[int, int]:
    if path is None:
        return -1, -1
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _digests(ds: Dataset, known: dict[str, tuple[int, int, str]]):
    """Content digest of every sample; files whose size and mtime match the cache are not re-read."""
    from .decode import DecodeError, os_error_reason

    out: dict[str, tuple[str, int, int]] = {}
    bad: list[tuple[Sample, str, str]] = []
    for s in ds.samples:
        if ds.arrays is not None:
            a = ds.arrays[s.index]
            out[s.key] = (digest_bytes(a.tobytes() + repr(a.shape).encode()), -1, -1)
            continue
        try:
            size, mtime = _stat(s.path)
            hit = known.get(s.key)
            if hit and hit[0] == size and hit[1] == mtime:
                out[s.key] = (hit[2], size, mtime)
                continue
            out[s.key] = (digest_bytes(ds.read(s)), size, mtime)
        except DecodeError as e:
            bad.append((s, "", str(e)))
        except OSError as e:
            bad.append((s, "", os_error_reason(e)))
    return out, bad


def _read_quarantine(path: Path) -> dict[str, str]:
    """digest → reason of files that failed before; an unchanged file is not decoded again."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {r["digest"]: r["reason"] for r in csv.DictReader(f) if r.get("digest")}


def _write_quarantine(path: Path, bad: list[tuple[Sample, str, str]]) -> Path | None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        if not bad:
            if path.exists():
                path.unlink()
            return None
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["key", "digest", "reason"])
            for s, digest, reason in bad:
                w.writerow([s.key, digest, reason])
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, e) from None
    return path


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("featcache", "tensorflow", "keras", "h5py", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


class _Lock:
    """An inter-process lock on one cache: a second run waits (saying so) or gives up with a clear message."""

    def __init__(self, final: Path, timeout: float, quiet: bool):
        from filelock import FileLock, Timeout

        self._lock, self._timeout_exc = FileLock(str(final) + ".lock"), Timeout
        self.final, self.timeout, self.quiet = final, timeout, quiet

    def __enter__(self):
        try:
            return self._acquire()
        except OSError as e:  # the lock file cannot be created: read-only or forbidden folder, disk full
            raise FeatcacheError(
                f"cannot lock {self.final} ({self.final.name}.lock: {e.strerror or e}); is the cache folder writable?"
            ) from None

    def _acquire(self):
        try:
            self._lock.acquire(timeout=0)
        except self._timeout_exc:
            if self.timeout == 0:
                raise FeatcacheError(
                    f"{self.final}: another featcache run is extracting into this cache; try again when it finishes"
                ) from None
            if not self.quiet:
                print(f"waiting for another featcache run on {self.final} ...", file=sys.stderr, flush=True)
            try:
                self._lock.acquire(timeout=self.timeout)
            except self._timeout_exc:
                raise FeatcacheError(
                    f"{self.final}: still locked by another run after {self.timeout:.0f} s"
                ) from None
        return self

    def __exit__(self, *exc):
        self._lock.release()


# ----------------------------------------------------------------------------------------------- engine


def _configure_threads(n: int) -> None:
    import tensorflow as tf

    n = n or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, n))
    except RuntimeError:
        pass  # already initialized in this process: keep what it has


def make_image_dataset(ds: Dataset, samples: list[Sample], size: int, policy: str, batch_size: int):
    """tf.data: parallel decode → the shared resize → batch → prefetch; yields (index, images, ok, why)."""
    import tensorflow as tf

    from .decode import DecodeError, decode_image, os_error_reason
    from .preprocess import resize_images

    failed = np.zeros((1, 1, 3), np.uint8)

    def load(i):
        s = samples[int(i)]
        try:
            raw = ds.read(s)
            img = decode_image(raw) if isinstance(raw, bytes) else to_rgb(raw)
            return img, True, b""
        except DecodeError as e:
            return failed, False, str(e).encode()
        except OSError as e:
            return failed, False, os_error_reason(e).encode()

    def load_tf(i):
        img, ok, why = tf.numpy_function(load, [i], [tf.uint8, tf.bool, tf.string], stateful=False)
        img = tf.ensure_shape(img, [None, None, 3])
        return i, resize_images(img, size, policy), ok, why

    # Fixed parallelism, autotune off: tearing down an autotuned iterator waits out the tuner's sleep
    # (runs ended on 10.24 s / 20.48 s boundaries), and on 2 cores the tuner finds nothing better.
    options = tf.data.Options()
    options.autotune.enabled = False
    d = tf.data.Dataset.range(len(samples)).map(
        load_tf, num_parallel_calls=os.cpu_count() or 2, deterministic=True
    )
    return d.batch(batch_size).prefetch(2).with_options(options)


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

    from .engines import make_engine

    dtype = np.dtype(cfg.extract.dtype)
    data = make_image_dataset(ds, pending, fm.image_size, cfg.backbone.resize, cfg.extract.batch_size)
    engine = make_engine(
        fm, cfg.extract.engine, cfg.extract.threads, cfg.extract.cache_dir, images=len(pending)
    )
    result.engine = engine.name
    progress = _progress(len(pending), cfg.extract.progress)
    bg = _BackgroundWriter(writer)
    t0 = time.perf_counter()
    # Everything alive now (TF, Keras, the model) is permanent: without this the cyclic GC keeps
    # re-scanning that huge object graph as the loop allocates, ~6 % of extraction's CPU.
    gc.freeze()
    try:
        for idx, images, ok, why in data:
            out = engine(images)
            result.batches += 1
            ok = ok.numpy()
            idx = idx.numpy()
            for i in np.flatnonzero(~ok):
                s = pending[int(idx[i])]
                reason = why.numpy()[i].decode("utf-8", "replace")
                if cfg.data.on_error == "fail":
                    raise FeatcacheError(f"cannot read {s.path or s.key}: {reason}")
                bad.append((s, digests[s.key][0], reason))
            keep = np.flatnonzero(ok)
            if len(keep):
                ids = [digests[pending[int(idx[i])].key][0] for i in keep]
                bg.put(ids, {layer: out[layer][keep].astype(dtype, copy=False) for layer in fm.layers})
                result.extracted += len(keep)
            progress.update(len(idx))
    finally:
        gc.unfreeze()
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


# ----------------------------------------------------------------------------------------------- API


def resolve_cache_path(cfg: Config, ds: Dataset | None = None) -> tuple[Path, dict[str, Any], Dataset]:
    """Where ``cfg``'s cache lives (building nothing when the weights digest is known without the model)."""
    spec = get_spec(cfg.backbone.name)
    ds = ds if ds is not None else load_dataset(cfg.data)
    digest = weights_digest(spec, cfg.backbone.weights, cfg.backbone.layers, cfg.extract.cache_dir)
    if digest is None:
        from .backbones.build import build_feature_model

        digest = build_feature_model(cfg.backbone).weights_digest()
        remember_weights_digest(spec, cfg.backbone.layers, cfg.extract.cache_dir, digest)
    key = _views_key(cfg, feature_key(cfg, spec, digest))  # augment_views > 0 changes the rows
    return Path(cfg.extract.cache_dir) / (cache_stem(ds.name, spec.name, fingerprint(key)) + ".h5"), key, ds


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
    with _Lock(final, cfg.extract.lock_timeout, quiet):
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
            return _update(cfg, ds, final, key, fp, old, result, t_start, keep_missing)
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
    known = {}
    if old is not None:
        known = {
            k: (int(s), int(m), d)
            for k, s, m, d in zip(old.keys, old.sizes, old.mtimes, old.ids, strict=True)
        }
    digests, bad = _digests(ds, known)
    if bad and cfg.data.on_error == "fail":
        s, _, reason = bad[0]
        raise FeatcacheError(f"cannot read {s.path or s.key}: {reason}")

    parts = scan_parts(final, fp)
    cached = set(old.ids) if old is not None else set()
    failed_before = _read_quarantine(quarantine_path(final))
    pending, seen = [], set()
    for s in ds.samples:
        if s.key not in digests:
            continue
        d = digests[s.key][0]
        if d in cached or d in parts or d in seen:
            continue
        if d in failed_before:
            if cfg.data.on_error == "fail":
                raise FeatcacheError(f"cannot read {s.path or s.key}: {failed_before[d]}")
            bad.append((s, d, failed_before[d]))
            continue
        seen.add(d)
        pending.append(s)

    if pending:
        from .backbones.build import build_feature_model

        _configure_threads(cfg.extract.threads)
        fm = build_feature_model(cfg.backbone)
        layer_dims, map_shapes = fm.dims, fm.map_shapes
        manifest = {
            "fingerprint": fp,
            "feature_key": key,
            "backbone": fm.spec.name,
            "dataset": ds.name,
            "layers": layer_dims,
        }
        writer = PartWriter(final, manifest)
        try:
            _run_backbone(fm, ds, pending, digests, cfg, writer, result, bad)
        except KeyboardInterrupt:
            raise FeatcacheError(
                f"interrupted: {writer.rows_written} new rows kept in {writer.dir}; run the same command again to resume"
            ) from None
        parts = scan_parts(final, fp)
    elif old is not None:
        layer_dims = {layer: old.dataset(layer).shape[1] for layer in old.layers}
        map_shapes = old.meta.get("map_shapes", {})
    else:
        layer_dims, map_shapes = _dims_from_parts(parts)

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
    if keep_missing and old is not None:
        current = {r.key for r in rows}
        for i, k in enumerate(old.keys):
            if k not in current:
                rows.append(
                    Row(
                        k,
                        old.ids[i],
                        int(old.labels[i]),
                        int(old.split[i]),
                        int(old.sizes[i]),
                        int(old.mtimes[i]),
                    )
                )
    if not rows:
        raise FeatcacheError(f"{ds.source}: no readable images ({len(bad)} unreadable; see the list above)")
    rows, parts = _augmented_views(cfg, ds, final, fp, key, rows, old, parts, result)

    result.rows = len(rows)
    result.skipped = len(bad)
    result.reused = len(rows) - result.extracted
    new_ids = {r.digest for r in rows}
    result.removed = len([d for d in (old.ids if old is not None else []) if d not in new_ids])
    result.problems = [(s.key, reason) for s, _, reason in bad]
    result.quarantine = _write_quarantine(quarantine_path(final), bad)

    if old is not None and not pending and _same_rows(old, rows, ds.class_names):
        result.seconds = time.perf_counter() - t_start
        clear_partial(final)
        return result

    b = cfg.backbone
    attrs = {
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
        "preprocess": key["preprocess"],
        "dtype": cfg.extract.dtype,
        "engine": result.engine
        or (old.meta.get("engine", "tensorflow") if old is not None else "tensorflow"),
        "dataset": ds.name,
        "source": os.path.abspath(ds.source) if ds.is_files or Path(ds.source).exists() else ds.source,
        "versions": _versions(),
        "config": {"data": vars(cfg.data), "backbone": vars(cfg.backbone), "extract": vars(cfg.extract)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_cache(
        final, rows, ds.class_names, layer_dims, attrs, old, parts, cfg.extract.dtype, cfg.extract.compression
    )
    if old is not None:
        old.close()
    clear_partial(final)
    result.seconds = time.perf_counter() - t_start
    return result


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


__all__ = ["ExtractResult", "extract", "resolve_cache_path", "make_image_dataset", "to_rgb"]


# ----------------------------------------------------------------------------------------------- augmented views
# ``extract.augment_views = K``: K augmented versions of every *train* image are cached as extra train rows
# (key ``<key>#aug<v>``, id = a digest of (image digest, v, recipe)), so every stage-2 head learns from
# augmentation with no change to training code, while val/test rows stay the plain images. The views are
# drawn with Keras' random layers (``finetune.augment``, the fine-tuning recipe) seeded by (digest, v): a
# rerun computes the same views and finds them cached. K and the recipe are in the fingerprint, so a cache
# with views never mixes with one without. Views go through the same parts as other rows (crash-safe,
# resumable) and are only computed for train images that have none yet.

VIEWS_RECIPE = 1  # bump when the augmentation factors in pipeline.rebuild.augmentation_layers change
VIEW_SUFFIX = "#aug"  # in the key of a view row; such rows have no image of their own


def _views_key(cfg: Config, key: dict[str, Any]) -> dict[str, Any]:
    k = int(cfg.extract.augment_views)
    if k < 0:
        raise FeatcacheError(f"config: extract.augment_views must be >= 0, got {k}")
    if k == 0:
        return key  # caches without views keep their fingerprint
    augment = [a.strip().lower() for a in cfg.finetune.augment if a.strip().lower() not in ("", "none")]
    if not augment:
        raise FeatcacheError("extract.augment_views needs at least one augmentation in finetune.augment")
    return {**key, "augment_views": {"k": k, "augment": augment, "recipe": VIEWS_RECIPE}}


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
    from .backbones.build import build_feature_model
    from .engines import make_engine
    from .rebuild import augmentation_layers

    _configure_threads(cfg.extract.threads)
    fm = build_feature_model(cfg.backbone)
    layers = augmentation_layers(spec["augment"])
    manifest = {
        "fingerprint": fp,
        "feature_key": key,
        "backbone": fm.spec.name,
        "dataset": ds.name,
        "layers": fm.dims,
    }
    writer = PartWriter(final, manifest)
    engine = make_engine(fm, cfg.extract.engine, cfg.extract.threads, cfg.extract.cache_dir)
    samples = [s for _, s, _ in todo]
    data = make_image_dataset(ds, samples, fm.image_size, cfg.backbone.resize, cfg.extract.batch_size)
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


from ._callable import callable_module  # noqa: E402

callable_module(__name__, "extract")
