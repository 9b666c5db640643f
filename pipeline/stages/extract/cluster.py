"""``extract``'s backbone pass on a Dask cluster: the missing samples as shards, written back as parts."""

from __future__ import annotations

import contextlib

from pipeline.cache.write import (
    PartWriter,
)
from pipeline.data.sources import Sample
from pipeline.stages.extract.job import ExtractJob, backbone_pass
from pipeline.utils.config import given_keys
from pipeline.utils.errors import FeatcacheError


def run_on_cluster(job: ExtractJob) -> tuple[dict[str, int], dict]:
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
        with backbone_pass(job, len(job.pending)) as progress:
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
