"""The features of new images as a cache holds them: read from the cache when their content is there,
else computed by the cache's own backbone, cut, pooling, decode policy and engine (locally, or on a Dask
cluster as extraction's shards). ``predict`` (a stage-2 run's head) and ``find`` (the query images) both
take their features here, so a query and a cached row of the same image agree.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np


def read_batches(ds, samples, image_size: int, resize: str, decode: str, batch_size: int, run):
    """Decode + shared resize in tf.data (as extraction does), ``run`` on each batch of readable images;
    (outputs stacked per sample or None, ok, why)."""
    from pipeline.data.images import image_batches

    n = len(samples)
    out = None
    ok_all, why_all = np.zeros(n, bool), [""] * n
    read = image_batches(ds, samples, image_size, resize, batch_size, decode=decode)
    for idx, x, ok, why in read:
        idx, ok, why = idx.numpy(), np.reshape(ok.numpy(), -1), np.reshape(why.numpy(), -1)
        keep = np.flatnonzero(ok)
        if len(keep):
            y = np.asarray(run(x.numpy()[keep]), np.float64)
            if out is None:
                out = np.zeros((n, y.shape[1]))
            out[idx[keep]] = y
        for j in np.flatnonzero(~ok):
            why_all[int(idx[j])] = why[j].decode("utf-8", "replace")
        ok_all[idx] = ok
    return out, ok_all, why_all


def backbone_config(src):
    from pipeline.model.rebuild import known_fields
    from pipeline.utils.config import BackboneConfig

    cfg = BackboneConfig(**known_fields(BackboneConfig, {**src.backbone, "layers": [src.layer]}))
    cfg.image_size = src.image_size
    return cfg


def feature_model(src, precision: str = "float32"):
    from pipeline.features.backbones.build import build_feature_model

    return build_feature_model(backbone_config(src), precision)


def run_engine(src) -> tuple[str, str, Any]:
    """The engine, precision and int8 calibration set the cache was extracted with (from its feature
    key): ``auto`` and float32 for every float cache, ``tflite-dynamic`` for a dynamic-range one."""
    from pipeline.cache.fingerprint import keyed_engine
    from pipeline.features.calibration import recorded

    key = (src.cache_meta or {}).get("feature_key") or {}
    precision, engine = str(key.get("precision", "float32")), keyed_engine(key)
    if engine != "tflite-int8":  # tflite-dynamic: no calibration, its gate passed when the cache was made
        return engine or "auto", precision, None
    return engine, precision, recorded(key["engine"], src.cache_meta)


def cached_rows(src, ds, samples) -> dict[int, int]:
    """sample index → row of ``src``'s cache holding the same content (by digest)."""
    from pipeline.cache.store import FeatureCache
    from pipeline.data.decode import DecodeError
    from pipeline.data.sources import digest_bytes
    from pipeline.index.rows import find_rows

    if src.cache_path is None:
        return {}
    digest_of = {}
    for i, s in enumerate(samples):
        try:
            digest_of[i] = s.digest or digest_bytes(ds.read(s))
        except (DecodeError, OSError):
            continue  # reported by the decoding pass
    with FeatureCache(src.cache_path) as c:
        row_of = find_rows(c.ids, digest_of.values())  # the images' digests only, not a dict of every row
    return {i: row_of[d] for i, d in digest_of.items() if d in row_of}


def source_features(src, ds, samples, dim: int, batch_size: int, cluster: str = "", progress: bool = False):
    """(features N×dim, ok, why, sources) of ``samples`` as ``src`` (a :class:`RunSource`) makes them;
    ``sources[i]`` is ``cache`` or ``computed``. The engine is the one that made the cache
    (:func:`run_engine`): ``auto`` reuses a TFLite model extraction already converted (validated against
    TensorFlow when it was), and an int8 cache's own int8 model, so new images match the cached rows.
    ``progress``: a bar over the images computed here."""
    n = len(samples)
    X = np.zeros((n, dim), np.float32)
    ok, why, sources = np.zeros(n, bool), [""] * n, ["computed"] * n
    hits = cached_rows(src, ds, samples)
    if hits:
        from pipeline.cache.store import FeatureCache

        idx = np.asarray(list(hits))
        with FeatureCache(src.cache_path) as c:
            X[idx] = c.features(src.layer, np.asarray([hits[i] for i in idx]))
        ok[idx] = True
        for i in idx:
            sources[int(i)] = "cache"
    todo = [i for i in range(n) if not ok[i]]
    if not todo:
        return X, ok, why, sources
    cache_dir = src.cache_path.parent if src.cache_path is not None else None
    part = [samples[i] for i in todo]
    if cluster:
        feats, ok_t, why_t = cluster_features(cluster, src, ds, part, batch_size, cache_dir)
    else:
        from pipeline.features.engines import make_engine

        name, precision, calibration = run_engine(src)
        fm = feature_model(src, precision)
        engine = make_engine(fm, name, 0, cache_dir, images=len(todo), calibration=calibration)
        from tqdm import tqdm

        bar = tqdm(total=len(part), desc="features", unit="img", disable=not progress)

        def run(x):
            bar.update(len(x))
            return engine(x)[src.layer]

        with contextlib.closing(bar):
            feats, ok_t, why_t = read_batches(
                ds, part, src.image_size, src.resize, src.decode, batch_size, run
            )
    for j, i in enumerate(todo):
        ok[i], why[i] = bool(ok_t[j]), why_t[j]
        if ok_t[j]:
            X[i] = feats[j]
    return X, ok, why, sources


def cluster_features(address: str, src, ds, samples, batch_size: int, cache_dir):
    """The features of ``samples`` computed by the Dask cluster at ``address`` (the shard tasks extraction
    runs, ``src``'s backbone settings; a lost worker's shard is run again); (features, ok, why) in
    ``samples`` order."""
    from pipeline.features.distributed import ShardSettings, run_shards
    from pipeline.utils.cluster import cluster_client

    n = len(samples)
    feats, ok, why = None, np.zeros(n, bool), [""] * n
    cache = str(cache_dir or "")
    name, precision, calibration = run_engine(src)
    settings = ShardSettings.make(
        backbone_config(src),
        name,
        0,
        cache,
        batch_size,
        "float32",
        n,
        src.decode,
        address,
        precision=precision,
    )
    with cluster_client(address) as client:  # the dashboard link on stderr, as extract prints it
        again = "run the same command again"
        shards = run_shards(client, settings, ds, samples, address, again, calibration=calibration)
        with contextlib.closing(shards):
            for start, _, r in shards:
                rows = start + np.asarray(r.ids, np.int64)
                if feats is None:
                    feats = np.zeros((n, r.dims[src.layer]), np.float32)
                feats[rows] = r.features[src.layer]
                ok[rows] = True
                for k, reason in r.bad:
                    why[start + k] = reason
    return feats, ok, why
