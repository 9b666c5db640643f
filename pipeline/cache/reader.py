"""Streaming reads of cached features: in memory when they fit the budget, else in bounded chunks."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.errors import FeatcacheError

MEMORY_FRACTION = 0.25  # of the RAM available now: room for the copy transforms make, and for the head


def memory_budget() -> int:
    """Bytes the features may take in memory: ``$FEATCACHE_MEMORY_BUDGET`` or 25 % of available RAM."""
    env = os.environ.get("FEATCACHE_MEMORY_BUDGET")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise FeatcacheError(f"FEATCACHE_MEMORY_BUDGET must be a number of bytes, got {env!r}") from None
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * MEMORY_FRACTION)


#: multi-label heads fit the whole multi-hot matrix at once, so a multi-label cache is never streamed
MEMORY_ONLY = "multi-label heads train in memory only; set train.streaming = memory"


def use_streaming(mode: str, n_bytes: int, budget: int | None = None, *, multilabel: bool = False) -> bool:
    """``memory``/``stream`` force the path; ``auto`` streams when the features exceed the budget. A
    multi-label cache is read into memory (``stream`` is refused: :data:`MEMORY_ONLY`)."""
    if multilabel and mode == "stream":
        raise FeatcacheError(MEMORY_ONLY)
    if mode == "memory" or (multilabel and mode == "auto"):
        return False
    if mode == "stream":
        return True
    if mode != "auto":
        raise FeatcacheError(f"train.streaming must be auto, memory or stream, got {mode!r}")
    return n_bytes > (memory_budget() if budget is None else budget)


READ_BYTES = 8 << 20  # :func:`read_parts` reads the file in consecutive slices of about this size
HANDOVER_ROWS = 16_384  # ... and hands the first part's rows over in blocks of at least this many


def read_parts(
    cache, layer: str, parts: Sequence[np.ndarray], each: Callable[[np.ndarray], Any] | None = None
) -> list[np.ndarray]:
    """The features of each of ``parts`` (sorted, disjoint rows) in a new array, in one pass over the file:
    consecutive slices read on a thread into one buffer, each part's rows copied out of it, while
    ``each(block)`` runs here on the first part's rows already read. Read apart, a run's val and test rows
    took every slice of the file again (their rows spread over all of it): at 1M rows × 1280 the one pass
    costs what the two did warm (7.5 s: checksums and copies) and reads the disk once, not twice, cold; and
    work on the rows no longer waits for the read (a cold 4 GB read, 23 s, then 14 s of work: 28 s in all
    overlapped). Sparse parts (under half the rows they span) are read as
    :meth:`~pipeline.cache.store.FeatureCache.features` reads rows."""
    from pipeline.cache.store import take_rows

    parts = [np.asarray(p, np.int64) for p in parts]
    dim = int(cache.dataset(layer).shape[1])
    outs = [np.empty((len(p), dim), np.float32) for p in parts]
    present = [p for p in parts if len(p)]
    if not present:
        return outs
    lo, hi = min(int(p[0]) for p in present), max(int(p[-1]) for p in present) + 1
    if sum(map(len, present)) < (hi - lo) / 2:
        for p, out in zip(parts, outs, strict=True):
            cache.features(layer, p, out=out)
        for i in range(0, len(outs[0]) if each else 0, HANDOVER_ROWS):
            each(outs[0][i : i + HANDOVER_ROWS])
        return outs
    step = max(1, READ_BYTES // (4 * dim))
    landed: queue.Queue = queue.Queue()
    stop, failed = threading.Event(), []

    def read() -> None:
        buf, at = np.empty((step, dim), np.float32), [0] * len(parts)
        try:
            for start in range(lo, hi, step):
                if stop.is_set():
                    return
                end = min(hi, start + step)
                cache.features(layer, np.arange(start, end), out=buf[: end - start])
                for k, p in enumerate(parts):
                    a, b = at[k], int(np.searchsorted(p, end))
                    take_rows(buf, p[a:b] - start, outs[k][a:b])
                    at[k] = b
                landed.put(at[0])
        except BaseException as e:  # noqa: BLE001 - raised again by the caller's thread
            failed.append(e)
        finally:
            landed.put(None)

    reader = threading.Thread(target=read, name="featcache-read", daemon=True)
    reader.start()
    done = 0
    try:
        with _beside_reader():
            while (upto := landed.get()) is not None:
                if each is not None and upto - done >= min(HANDOVER_ROWS, len(parts[0]) - done):
                    each(outs[0][done:upto])
                    done = upto
    finally:
        stop.set()
        reader.join()
    if failed:
        raise failed[0]
    if each is not None and done < len(parts[0]):
        each(outs[0][done:])
    return outs


@contextmanager
def _beside_reader():
    """The BLAS on one core fewer while the reader thread copies: one thread per core, not one more. At 1M ×
    1280 on 2 cores, the read with the novelty pass beside it took 8.7–9.3 s with the pass on one BLAS
    thread, 10.9–12.8 s on two (threads that spin while the reader holds a core), 12.5 s one after the other."""
    from threadpoolctl import threadpool_limits

    from pipeline.utils.workers import current_blas_threads

    with threadpool_limits(max(1, current_blas_threads() - 1), user_api="blas"):
        yield


def shared_memory_room(size: int) -> bool:
    """Whether POSIX shared memory can hold ``size`` more bytes: a container's ``/dev/shm`` is often 64 MB,
    and writing past its end kills the process (SIGBUS) instead of failing; without room, workers get a
    pickled copy as before."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (macOS, Windows): shared memory is not a small tmpfs there
        return True
    return st.f_bavail * st.f_frsize >= size + (64 << 20)


_OPEN: dict[tuple[int, str], Any] = {}  # (pid, path) → FeatureCache: one handle per process


def _open_cache(path: str):
    from pipeline.cache.store import FeatureCache

    key = (os.getpid(), path)
    if key not in _OPEN:
        _OPEN[key] = FeatureCache(path)
    return _OPEN[key]


def close_cache(path: str | Path) -> None:
    """Close this process's streaming handle on ``path``, if any."""
    handle = _OPEN.pop((os.getpid(), str(path)), None)
    if handle is not None:
        handle.close()


@dataclass
class Data:
    """Features of one cached layer for a set of rows: an array in memory, or HDF5 read on demand.

    Only ``rows`` are reachable, so a search built without the test rows cannot read them. It pickles
    small (path + rows; joblib memory-maps ``X``), which is how search trials reach their workers.
    """

    path: str
    layer: str
    labels: np.ndarray  # labels of every cache row, in memory (one int a row; multi-label: a multi-hot row)
    n_features: int
    rows: np.ndarray  # sorted rows this object may serve
    X: np.ndarray | None = None  # features of ``rows`` when in memory; None = streamed
    shm: Any = field(default=None, repr=False, compare=False)  # the shared memory ``X`` lives in, if any

    @property
    def streamed(self) -> bool:
        return self.X is None

    @classmethod
    def from_cache(cls, cache, layer: str, rows: np.ndarray, streamed: bool, shared: bool = False) -> Data:
        """``rows`` of ``layer``, read into memory unless ``streamed``; with ``shared``, into shared memory
        that worker processes this object is sent to attach to instead of receiving a copy (a search's
        trial workers: at 1M rows the pickled features were a 4.6 GB copy in the parent and another in
        the worker). The reader owns it: :meth:`release` frees it."""
        from multiprocessing.shared_memory import SharedMemory

        rows = np.sort(np.asarray(rows))
        n_features = int(cache.dataset(layer).shape[1])
        if streamed:
            return cls(str(cache.path), layer, cache.labels, n_features, rows)
        size = len(rows) * n_features * 4
        shm = (
            SharedMemory(create=True, size=size)
            if shared and len(rows) and shared_memory_room(size)
            else None
        )
        X = None if shm is None else np.ndarray((len(rows), n_features), np.float32, buffer=shm.buf)
        X = cache.features(layer, rows, out=X)
        return cls(str(cache.path), layer, cache.labels, n_features, rows, X, shm)

    def release(self) -> None:
        """Free the shared memory this process created for ``X`` (workers attached to it only detach)."""
        if self.shm is not None:
            shm, self.shm, self.X = self.shm, None, None
            shm.close()
            shm.unlink()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.shm is not None:  # the name of the block, not the features
            state["X"], state["shm"] = None, (self.shm.name, self.X.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("shm"), tuple):
            from multiprocessing.shared_memory import SharedMemory

            name, shape = state["shm"]
            block = SharedMemory(name)  # attached, read-only use; the block stays the creator's to free
            state["X"] = np.ndarray(shape, np.float32, buffer=block.buf)
            state["X"].flags.writeable = False
            state["shm"] = None
            state["_attached"] = block  # kept open as long as this object
        self.__dict__.update(state)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.rows, rows)
        pos = np.clip(pos, 0, max(len(self.rows) - 1, 0))
        if len(rows) and (len(self.rows) == 0 or not np.array_equal(self.rows[pos], rows)):
            raise FeatcacheError("internal: rows outside this data view were requested")
        return pos

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Features of ``rows`` (in that order), from memory or from HDF5."""
        rows = np.asarray(rows)
        pos = self.positions(rows)
        if self.X is not None:
            return self.X[pos]
        return _open_cache(self.path).features(self.layer, rows)

    def chunks(
        self,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        transform=None,
        min_rows: int = 1,
    ) -> ChunkSequence:
        self.positions(np.sort(np.asarray(rows)))
        return ChunkSequence(
            self, rows, batch_size, shuffle=shuffle, seed=seed, transform=transform, min_rows=min_rows
        )


class ChunkSequence:
    """(X, y) batches of ``rows`` read as contiguous HDF5 slices; memory stays at one batch.

    Rows are cut into short runs (``segment``) and each batch joins several runs from different places, so
    a shuffled epoch mixes classes even when the cache is sorted by class, while every read stays a slice.
    Supports ``len``/``[i]``/iteration and ``on_epoch_end`` (reshuffles), so Keras can use it as is.
    """

    def __init__(
        self,
        data: Data,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        transform=None,
        min_rows: int = 1,
    ):
        self.data = data
        rows = np.sort(np.asarray(rows))
        self.batch_size = max(int(batch_size), 1)
        seg = max(1, min(self.batch_size, max(8, self.batch_size // 8))) if shuffle else self.batch_size
        self.segments = [rows[i : i + seg] for i in range(0, len(rows), seg)]
        self.per_batch = max(1, self.batch_size // seg)
        self.shuffle, self.transform, self.min_rows = shuffle, transform, max(1, int(min_rows))
        self.rng = np.random.default_rng(seed)
        self.n_features = data.n_features
        self.reads = 0
        self._order = np.arange(len(self.segments))
        if shuffle:
            self.rng.shuffle(self._order)
        self._group()

    def _group(self) -> None:
        groups = [
            list(self._order[i : i + self.per_batch]) for i in range(0, len(self._order), self.per_batch)
        ]
        if len(groups) > 1 and sum(len(self.segments[s]) for s in groups[-1]) < self.min_rows:
            groups[-2].extend(groups.pop())  # IncrementalPCA needs >= n_components rows per batch
        self._groups = groups

    def __len__(self) -> int:
        return len(self._groups)

    def rows_of(self, i: int) -> np.ndarray:
        return np.concatenate([self.segments[s] for s in self._groups[i]])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self._groups):
            raise IndexError(i)
        parts = [self._read(self.segments[s]) for s in self._groups[i]]
        X = np.concatenate(parts) if len(parts) > 1 else parts[0]
        y = self.data.labels[self.rows_of(i)]
        if self.transform is not None:
            X = self.transform(X)
        return X, y

    def _read(self, seg: np.ndarray) -> np.ndarray:
        self.reads += 1
        if self.data.X is not None:
            return self.data.X[self.data.positions(seg)]
        ds = _open_cache(self.data.path).dataset(self.data.layer)
        lo, hi = int(seg[0]), int(seg[-1]) + 1
        if hi - lo <= 2 * len(seg):  # dense: one slice, the few rows between are dropped
            return np.asarray(ds[lo:hi], dtype=np.float32)[seg - lo]
        # sparse (e.g. val rows spread over the file): read only these rows, so memory stays at one batch
        return np.asarray(ds[seg], dtype=np.float32)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self._order)
            self._group()
