"""What a cache file holds and says about itself: its layout, and the metadata recording what made it.

Layout of a complete cache ``<name>.h5`` (readable with plain h5py or ``h5dump``)::

    /features/<layer>   N×D float32|float16, chunked   one dataset per extracted layer
    /labels             N int32                         index into /class_names
                        N×C uint8 (multi-label)         1 where the row has class c (attr task)
    /class_names        C str
    /split              N uint8                         0 train, 1 val, 2 test (attr ``names``)
    /keys               N str                           sample path relative to the dataset root
    /ids                N str                           content digest of the sample
    /sizes, /mtimes     N int64                         file stat, so a rerun need not re-read files
    attrs: fingerprint, feature_key, backbone, weights, weights_digest, layers, map_shapes, pooling,
           image_size, resize, decode (0.2; absent = exact), preprocess, dtype, engine, dataset, source,
           source_id (the source's identity, :func:`pipeline.cache.fingerprint.source_identity`; absent in
           caches written before it: matched by name, see :mod:`pipeline.cache.locate`), versions, config, created, task (``multilabel``; absent = single-label) (:func:`cache_attrs`), then format, n_rows, complete and attrs_sha256
           (added by :func:`pipeline.cache.write.write_cache`, ``complete`` and the digest last)

An interrupted run's ``<name>.partial/manifest.json`` carries :func:`part_manifest` plus ``rows_written``
and ``updated``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.data.samples import Dataset
from pipeline.data.storage import is_url
from pipeline.utils.config import MULTILABEL, Config

FORMAT = "featcache/1"


def part_manifest(fp: str, key: dict[str, Any], ds: Dataset, dims: dict[str, int]) -> dict[str, Any]:
    """What an interrupted run's parts were extracted with: only parts of the same fingerprint are reused."""
    return {
        "fingerprint": fp,
        "feature_key": key,
        "backbone": key["backbone"],
        "dataset": ds.name,
        "layers": dims,
    }


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("featcache", "tensorflow", "keras", "h5py", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def cache_attrs(
    cfg: Config,
    ds: Dataset,
    key: dict[str, Any],
    fp: str,
    layer_dims: dict[str, int],
    map_shapes: dict,
    engine: str,
    old_meta: dict[str, Any] | None,
    source_id: str,
    fidelity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The cache file's metadata: what made the features, from what, with which versions.

    ``engine`` ran the backbone in this run ("" when none ran: the file keeps ``old_meta``'s engine);
    ``fidelity``: a ``tflite-dynamic`` engine's gate figures (``engine_fidelity``, kept from ``old_meta`` when
    this run measured none)."""
    b = cfg.backbone
    task = (
        {"task": MULTILABEL} if ds.multilabel else {}
    )  # a single-label cache's attributes stay as they were
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
        "engine": engine or (old_meta.get("engine", "tensorflow") if old_meta is not None else "tensorflow"),
        "dataset": ds.name,
        "source": ds.source
        if is_url(ds.source) or not (ds.is_files or Path(ds.source).exists())
        else os.path.abspath(ds.source),
        "source_id": source_id,
        "versions": package_versions(),
        "config": {
            "data": cfg.to_dict()["data"],
            "backbone": vars(cfg.backbone),
            "extract": vars(cfg.extract),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **task,
        **_fidelity(fidelity, old_meta),
    }


def _fidelity(fidelity: dict[str, Any] | None, old_meta: dict[str, Any] | None) -> dict[str, Any]:
    """The ``engine_fidelity`` attribute of a dynamic-range cache (every other cache has none)."""
    kept = fidelity or (old_meta or {}).get("engine_fidelity")
    return {"engine_fidelity": kept} if kept else {}
