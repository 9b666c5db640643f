"""The image pipeline every stage reads pixels through: decode, the shared resize, tf.data batches."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.augment import is_view_key
from pipeline.data.sources import Dataset, Sample, storable_key
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.workers import usable_cores


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


def make_image_dataset(
    ds: Dataset, samples: list[Sample], size: int, policy: str, batch_size: int, *, decode: str
):
    """tf.data: parallel decode → the shared resize → batch → prefetch; yields (index, images, ok, why).

    ``decode`` is the ``data.decode`` policy the features are (or were) extracted with: every stage that
    reads images for a cache or a run passes the cache's own policy, so all of them see the same pixels.
    """
    import tensorflow as tf

    from pipeline.data.decode import decode_request
    from pipeline.data.preprocess import resize_images

    load = _loader(ds, samples, decode_request(size, decode))

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


#: Images per task of :func:`numpy_batches`' thread pool: few enough tasks that queueing costs nothing,
#: enough that both cores stay busy to the end of a batch.
CHUNK = 4


def numpy_batches(
    ds: Dataset,
    samples: list[Sample],
    size: int,
    policy: str,
    batch_size: int,
    *,
    decode: str,
    threads: int = 0,
):
    """(index, images, ok, why) NumPy batches of the same pixels as :func:`make_image_dataset`, for the loops
    that feed a backbone themselves (extraction, cluster shards).

    When the compiled area resize (:mod:`pipeline.data.area`) covers the first image, images are decoded and
    shrunk on a thread pool straight into the batch, two batches ahead: per 500×375 photo that spares ~2 ms
    of CPU the ``tf.data`` path spends on its per-image graph (the resize op, the branch, the machinery).
    Datasets of small images (enlarged, e.g. Fashion-MNIST) keep the ``tf.data`` pipeline; a stray small
    image among large ones is resized by TensorFlow on its own, with the same pixels either way.
    ``threads`` (0 = every usable core) sizes the pool; 1 decodes in the calling thread.
    """
    from pipeline.data import area
    from pipeline.data.decode import decode_request

    load = _loader(ds, samples, decode_request(size, decode))
    first = [load(0)] if samples and area.available() else []
    if first and area.shrinks(first[0][0].shape, size, policy):

        def load_once(i):  # the first image is read and decoded once, not again for its batch
            return first.pop() if i == 0 and first else load(i)

        threads = threads or usable_cores()
        yield from _pooled_batches(load_once, len(samples), size, policy, batch_size, threads)
        return
    for idx, images, ok, why in make_image_dataset(ds, samples, size, policy, batch_size, decode=decode):
        yield idx.numpy(), images.numpy(), ok.numpy(), why.numpy()


def _loader(ds: Dataset, samples: list[Sample], request):
    """Sample position → (H×W×3 uint8, ok, reason): the one read-and-decode step of both pipelines."""
    from pipeline.data.decode import DecodeError, decode_image, os_error_reason

    failed = np.zeros((1, 1, 3), np.uint8)

    def load(i):
        s = samples[int(i)]
        try:
            raw = ds.read(s)
            img = decode_image(raw, reduce_to=request) if isinstance(raw, bytes) else to_rgb(raw)
            return img, True, b""
        except DecodeError as e:
            return failed, False, str(e).encode()
        except OSError as e:
            return failed, False, os_error_reason(e).encode()

    return load


def _pooled_batches(load, n: int, size: int, policy: str, batch_size: int, threads: int):
    """:func:`numpy_batches` on ``threads`` threads: the decoder and the compiled resize release the GIL.

    With one thread (a single-threaded Dask worker: ``local:N``'s layout, one worker per core) the batch is
    decoded in the calling thread, between backbone calls: each core then runs one thread, never switching
    between processes. Measured on 2 cores, 1,024 photos, 4 interleaved repetitions: the cluster's batch
    loop ran 81.6 images/s decoding inline against 75.6 with two decode threads per worker (77.2 with one).
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.area import resize_array

    def fill(batch, first: int, lo: int, hi: int) -> None:
        idx, images, ok, why = batch
        for i in range(lo, hi):
            img, good, reason = load(i)
            j = i - first
            idx[j], ok[j], why[j] = i, good, reason
            if good:
                pixels = resize_array(img, size, policy)
                images[j] = pixels if pixels is not None else _tf_resize(img, size, policy)
            else:
                images[j] = 0.0

    def empty(first: int):
        m = min(batch_size, n - first)
        return np.empty(m, np.int64), np.empty((m, size, size, 3), np.float32), np.empty(m, bool), [b""] * m

    def done(batch):
        idx, images, ok, why = batch
        return idx, images, ok, np.asarray(why, dtype=object)

    if threads <= 1:
        for first in range(0, n, batch_size):
            batch = empty(first)
            fill(batch, first, first, first + len(batch[0]))
            yield done(batch)
        return

    def submit(pool, first: int):
        batch = empty(first)
        lo = range(first, first + len(batch[0]), CHUNK)
        return batch, [pool.submit(fill, batch, first, a, min(a + CHUNK, first + len(batch[0]))) for a in lo]

    starts = deque(range(0, n, batch_size))
    with ThreadPoolExecutor(threads, thread_name_prefix="featcache-decode") as pool:
        ahead = deque(submit(pool, starts.popleft()) for _ in range(min(2, len(starts))))
        try:
            while ahead:
                batch, tasks = ahead.popleft()
                for t in tasks:
                    t.result()
                if starts:
                    ahead.append(submit(pool, starts.popleft()))
                yield done(batch)
        finally:
            for _, tasks in ahead:
                for t in tasks:
                    t.cancel()


def _tf_resize(img: np.ndarray, size: int, policy: str) -> np.ndarray:
    from pipeline.data.preprocess import resize_images

    return np.asarray(resize_images(img, size, policy))


def samples_for_rows(cache, ds, rows: np.ndarray):
    """(rows kept, their samples, keys missing from the dataset); augmented-view rows are never images."""
    by_key = {s.key: s for s in ds.samples}
    kept, samples, missing = [], [], []
    for r in np.asarray(rows):
        key = cache.keys[int(r)]
        if is_view_key(key):
            continue
        s = by_key.get(key)
        if s is None:
            missing.append(key)
            continue
        kept.append(int(r))
        samples.append(s)
    return np.asarray(kept, np.int64), samples, missing


def image_batches(ds, samples, size: int, policy: str, batch_size: int, *, decode: str):
    """tf.data of (index, S×S images, ok, why): :func:`make_image_dataset`, the same pixels extraction fed
    the backbone."""

    return make_image_dataset(ds, samples, size, policy, batch_size, decode=decode)


def thumbnails(ds, samples, size: int, policy: str, *, decode: str, side: int = 112) -> dict[str, bytes]:
    """Sample key → PNG thumbnail (at most ``side`` px) of ``samples`` as the backbone saw them, read by
    :func:`image_batches`; unreadable samples are left out."""
    import io

    from PIL import Image

    out: dict[str, bytes] = {}
    for idx, images, ok, _ in image_batches(ds, samples, size, policy, 16, decode=decode):
        for i, img, good in zip(idx.numpy(), images.numpy(), ok.numpy(), strict=True):
            if good:
                im = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
                im.thumbnail((side, side))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                out[samples[int(i)].key] = buf.getvalue()
    return out


def load_images(images, size: int, resize: str = "stretch", decode: str = "dct") -> np.ndarray:
    """Image files (paths or their bytes) → N×S×S×3 float32 raw RGB 0..255, exactly what extraction feeds
    the backbone: the same decoder, ``data.decode`` policy and shared resize.

    The preprocessing helper for exported models: a TFLite export takes these S×S images as they are;
    pass the ``image_size``, ``resize`` and ``decode`` its ``export.json`` records. Raises
    :class:`pipeline.data.decode.DecodeError` for a file that cannot be read.
    """
    from pipeline.data.decode import decode_image, decode_request
    from pipeline.data.preprocess import resize_images

    request = decode_request(size, decode)
    out = np.zeros((len(images), size, size, 3), np.float32)
    for i, item in enumerate(images):
        source = bytes(item) if isinstance(item, (bytes, bytearray, memoryview)) else os.fspath(item)
        out[i] = np.asarray(resize_images(decode_image(source, reduce_to=request), size, resize))
    return out


@dataclass
class SplitImages:
    rows: np.ndarray  # cache rows
    samples: list
    labels: np.ndarray


def split_images(cache, ds, split: str) -> SplitImages:
    from pipeline.data.images import samples_for_rows

    rows, samples, missing = samples_for_rows(cache, ds, cache.rows(split))
    if missing:
        print(
            f"note: {len(missing)} {split} image(s) of the cache are no longer in the dataset (e.g. {missing[0]}); skipped",
            file=sys.stderr,
        )
    return SplitImages(rows, samples, cache.labels[rows] if len(rows) else np.zeros(0, np.int64))


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given; folders walked recursively for image files (hidden ones skipped), sorted."""
    from pipeline.data.decode import IMAGE_EXTENSIONS

    out: list[Path] = []
    for raw in items:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [
                    Path(dirpath) / f
                    for f in sorted(filenames)
                    if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
                ]
            if not found:
                raise FeatcacheError(f"{raw}: no image files in this folder")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise FeatcacheError(f"image not found: {raw}")
    if not out:
        raise FeatcacheError("no images given")
    return out


def path_dataset(paths: list[Path]):
    """A dataset of loose image files (no labels), keyed by their paths: what predict and find read."""
    samples = [Sample(storable_key(str(p)), "", path=str(p)) for p in paths]
    return Dataset("predict", "<paths>", samples, [""]), samples
