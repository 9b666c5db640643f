"""Extraction on a Dask cluster: the shard plan (driver side) and the shard task (worker side).

The driver plans the samples still missing as deterministic shards (dataset order, fixed size) and submits
one task per shard. A task receives plain data only — the backbone *settings*, the shard's samples (paths,
or the shard's own rows of an array dataset) — never a Keras model (which does not pickle, distributed
#2333): each worker process builds the feature model from the settings once and keeps it, with its engine,
for every later task with the same settings. The task returns the features of the images it could read and
the reasons for those it could not; a bad image never fails a task. The driver writes what comes back.

A ``tflite-int8`` job is calibrated and converted once, by the driver (into ``cache_dir`` like one process
would, or reused from there), and a ``tflite-dynamic`` job converted and gated once there; the converted
model goes to each worker once (scattered), so the workers need neither the calibration images nor a
shared disk, and all of them run the very same quantized model. On a
worker with a GPU, ``auto`` runs TensorFlow there, as one process would (:mod:`pipeline.features.devices`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.images import numpy_batches
from pipeline.data.sources import Dataset, Sample
from pipeline.utils.cluster import worker_threads
from pipeline.utils.collector import frozen_gc
from pipeline.utils.config import BackboneConfig
from pipeline.utils.errors import FeatcacheError

#: A shard is this many batches at most: big enough to amortise a task's overhead, small enough that a
#: lost worker costs little and the progress bar moves.
MAX_BATCHES_PER_SHARD = 8

#: Each shard takes 1/(this × workers) of what is still unplanned (guided self-scheduling): big shards
#: first, one-batch shards at the end, so workers finish together instead of one idling through another's
#: last big shard. On 2 workers and 1,024 photos the gain is within run-to-run noise (batch loop 0.87× one
#: process before, 0.87–0.91× in three runs after); the idle tail it removes grows with the shard size.
GUIDE = 2


@dataclass(frozen=True)
class ShardSettings:
    """Everything a worker needs to build its model and engine; hashable, so it keys the per-process cache."""

    backbone: str  # BackboneConfig as canonical JSON
    engine: str
    threads: int  # 0 = the worker's threads
    cache_dir: str  # where a converted TFLite model is kept (shared with every run on this cache); "" = none
    batch_size: int
    dtype: str
    decode: str = "exact"  # data.decode: how JPEGs are decoded, as in a local run
    # images in the whole job (``auto`` skips a conversion a small job would not repay); not part of the
    # key, so a warm worker keeps its model from one job to the next
    images: int = field(default=0, compare=False)
    # TensorFlow's intra-op threads (0 = the worker's threads). TensorFlow's CPU kernels round by their
    # thread count (2.4e-6 apart between 1 and 2 threads; TFLite/XNNPACK is bit-identical): a cluster on
    # this machine uses the count one process would, so its cache equals one process's.
    tf_threads: int = 0
    precision: str = "float32"  # extract.precision
    batch_given: bool = True  # False: a worker with a GPU reads batches of its own size

    @classmethod
    def make(
        cls,
        backbone: BackboneConfig,
        engine: str,
        threads: int,
        cache_dir: str,
        batch_size: int,
        dtype: str,
        images: int,
        decode: str,
        address: str,
        *,
        precision: str = "float32",
        batch_given: bool = True,
    ):
        """Settings for a job on the cluster at ``address``: on a local one, TensorFlow runs with the threads
        one process here would use (the same rounding, so the same features); elsewhere with the worker's."""
        from pipeline.features.engines import tf_thread_count
        from pipeline.utils.cluster import parse_address

        tf_threads = tf_thread_count(threads) if parse_address(address).kind == "local" else 0
        text = json.dumps(dataclasses.asdict(backbone), sort_keys=True)
        return cls(
            text,
            engine,
            threads,
            cache_dir,
            batch_size,
            dtype,
            decode,
            images,
            tf_threads,
            precision,
            batch_given,
        )


@dataclass
class ShardResult:
    shard: int
    ids: list[int]  # positions in the shard of the rows in ``features``
    features: dict[str, np.ndarray]
    bad: list[tuple[int, str]]  # (position in the shard, reason)
    engine: str
    dims: dict[str, int]
    map_shapes: dict[str, list[int]]
    batches: int = 0
    seconds: float = 0.0
    size: int = 0
    worker: str = field(default="")
    device: str = ""  # where the worker ran the backbone (:func:`pipeline.features.devices.engine_device`)
    fidelity: dict[str, Any] = field(default_factory=dict)  # tflite-dynamic: the driver's gate figures


def plan_shards(pending: list[Sample], batch_size: int, workers: int) -> list[list[Sample]]:
    """``pending`` in dataset order as shards of whole batches, shrinking from :data:`MAX_BATCHES_PER_SHARD`
    to one batch (see :data:`GUIDE`). Depends only on its arguments, so a plan is reproducible."""
    batches = math.ceil(len(pending) / batch_size)
    shards, start = [], 0
    while batches > 0:
        take = min(MAX_BATCHES_PER_SHARD, max(1, math.ceil(batches / (GUIDE * max(1, workers)))))
        shards.append(pending[start : start + take * batch_size])
        start, batches = start + take * batch_size, batches - take
    return shards


def run_shards(
    client,
    settings: ShardSettings,
    ds: Dataset,
    pending: list[Sample],
    address: str,
    on_lost: str,
    calibration=None,
) -> Iterator[tuple[int, list[Sample], ShardResult]]:
    """``pending`` as planned shards on ``client``'s workers, one task each; every finished shard (its
    position in ``pending``, its samples, its result) as it arrives. A task that failed on every worker it
    tried, or a lost scheduler, is one line (``on_lost`` says what the user keeps); tasks not done are
    cancelled when the caller closes the iterator. ``calibration``: a ``tflite-int8`` job's calibration set,
    a ``tflite-dynamic`` job's gate set (None: not gated, as for predict of a cache gated already)."""
    from distributed import as_completed

    shards = plan_shards(pending, settings.batch_size, max(1, sum(client.nthreads().values())))
    quantized = settings.engine in ("tflite-int8", "tflite-dynamic")
    model = quantized_model(settings, calibration) if quantized else None
    if model is not None:
        model = client.scatter(model, broadcast=True)  # once per worker, not once per task
    futures = [
        client.submit(run_shard, settings, i, shard_dataset(ds, s), model, pure=False)
        for i, s in enumerate(shards)
    ]
    starts = np.cumsum([0] + [len(s) for s in shards])
    try:
        for fut in as_completed(futures):
            r = _result(fut, address, on_lost)
            yield int(starts[r.shard]), shards[r.shard], r
    finally:
        client.cancel([f for f in futures if not f.done()])


def _result(fut, address: str, on_lost: str) -> ShardResult:
    try:
        return fut.result()
    except FeatcacheError:
        raise
    except (OSError, TimeoutError) as e:
        raise FeatcacheError(f"cluster: lost the scheduler at {address} ({e}); {on_lost}") from None
    except Exception as e:  # noqa: BLE001 - KilledWorker and the like: one line
        raise FeatcacheError(f"cluster: an extraction task failed ({type(e).__name__}: {e})") from None
    finally:
        fut.release()


def shard_dataset(ds: Dataset, samples: list[Sample]) -> Dataset:
    """The part of ``ds`` a task needs: its samples, with an array dataset's rows copied and renumbered."""
    if ds.arrays is None:
        return Dataset(ds.name, ds.source, list(samples), list(ds.class_names))
    rows = np.asarray([s.index for s in samples], np.int64)
    renumbered = [dataclasses.replace(s, index=i) for i, s in enumerate(samples)]
    return Dataset(ds.name, ds.source, renumbered, list(ds.class_names), arrays=ds.arrays[rows])


def quantized_model(settings: ShardSettings, calibration) -> tuple[bytes, dict[str, str], dict[str, Any]]:
    """The driver's ``tflite-int8`` or ``tflite-dynamic`` model for ``settings`` (converted once, or reused
    from ``cache_dir``; checked as one process checks it): the flatbuffer, its output names and the gate's
    figures, what a worker's engine needs."""
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import make_engine

    fm = build_feature_model(BackboneConfig(**json.loads(settings.backbone)))
    cache = settings.cache_dir or None
    engine = make_engine(fm, settings.engine, settings.threads, cache, calibration=calibration)
    return engine.source, dict(engine.output_names), dict(engine.fidelity)


_MODELS: dict[ShardSettings, tuple[Any, Any]] = {}  # this process's feature model and engine per settings


def _model_and_engine(settings: ShardSettings, model: tuple[bytes, dict[str, str]] | None = None):
    """Built once per worker process and kept for later tasks; ``model``: the driver's quantized model."""
    got = _MODELS.get(settings)
    if got is not None:
        return got
    from pipeline.data import area
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import TFLiteEngine, configure_tf_threads, make_engine
    from pipeline.utils.collector import skip_gc_at_exit

    area.prepare()
    threads = settings.threads or worker_threads()
    configure_tf_threads(settings.tf_threads or threads)
    fm = build_feature_model(BackboneConfig(**json.loads(settings.backbone)), settings.precision)
    if model is not None:
        engine = TFLiteEngine(model[0], fm.layers, model[1], threads, name=settings.engine)
        engine.fidelity = dict(model[2])
    else:
        engine = make_engine(fm, settings.engine, threads, settings.cache_dir or None, images=settings.images)
    _MODELS.clear()  # one model per process: a new job's settings replace the old ones
    _MODELS[settings] = (fm, engine)
    skip_gc_at_exit()  # a worker with TensorFlow loaded then stops in 0.1 s instead of 1.4 s
    return fm, engine


def run_shard(settings: ShardSettings, shard: int, ds: Dataset, model=None) -> ShardResult:
    """Extract every sample of ``ds`` (one shard): features of the readable ones, reasons for the rest.

    ``model``: the driver's converted model, for a ``tflite-int8`` or ``tflite-dynamic`` job."""
    from pipeline.features.devices import engine_device, extraction_batch_size

    fm, engine = _model_and_engine(settings, model)
    t0 = time.perf_counter()
    dtype = np.dtype(settings.dtype)
    batch = extraction_batch_size(settings.engine, fm.image_size, settings.batch_size, settings.batch_given)
    data = numpy_batches(  # a single-threaded worker (local:N) decodes between its backbone calls
        ds,
        ds.samples,
        fm.image_size,
        _resize(settings),
        batch,
        decode=settings.decode,
        threads=settings.threads or worker_threads(),
    )
    ids: list[int] = []
    chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in fm.layers}
    bad: list[tuple[int, str]] = []
    batches = 0
    with frozen_gc():  # as in one process: the worker's TensorFlow and Keras objects are not re-scanned
        for idx, images, ok, why in data:
            out = engine(images)
            batches += 1
            for i in np.flatnonzero(~ok):
                bad.append((int(idx[i]), why[i].decode("utf-8", "replace")))
            keep = np.flatnonzero(ok)
            if len(keep):
                ids.extend(int(idx[i]) for i in keep)
                for layer in fm.layers:
                    chunks[layer].append(out[layer][keep].astype(dtype, copy=False))
    features = {
        layer: np.concatenate(c) if c else np.zeros((0, fm.dims[layer]), dtype) for layer, c in chunks.items()
    }
    return ShardResult(
        shard,
        ids,
        features,
        bad,
        engine.name,
        dict(fm.dims),
        dict(fm.map_shapes),
        batches,
        time.perf_counter() - t0,
        len(ds.samples),
        _worker_name(),
        engine_device(engine),
        dict(getattr(engine, "fidelity", {})),
    )


def _resize(settings: ShardSettings) -> str:
    return json.loads(settings.backbone)["resize"]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return ""
