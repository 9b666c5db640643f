"""``extract``'s augmented views: K seeded views of every train row, extracted as rows of their own."""

from __future__ import annotations

import numpy as np

from pipeline.cache.write import (
    Row,
)
from pipeline.data.augment import VIEW_SUFFIX, augmented_view
from pipeline.data.images import make_image_dataset
from pipeline.data.sources import Sample, digest_bytes
from pipeline.data.splits import SPLIT_CODES
from pipeline.stages.extract.job import ExtractJob, backbone_pass
from pipeline.utils.errors import FeatcacheError


def augmented_views(job: ExtractJob, rows: list[Row]) -> list[Row]:
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
    with backbone_pass(job, len(todo)) as progress:
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
