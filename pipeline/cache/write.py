"""Writing the cache: interrupted-run parts, then the complete HDF5 file, built atomically from old rows and parts.

Writing never touches a complete cache in place. Extracted batches go to ``<name>.partial/part-*.npz``
(each written to a temp name, then renamed: a part exists whole or not at all), and the complete file is
rebuilt as ``<name>.h5.tmp-*`` and renamed over the old one. ``kill -9`` at any moment leaves either the
old complete cache plus whole parts, so the next run resumes, or the new complete cache. The file's layout
and attributes: :mod:`pipeline.cache.schema`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.h5 import attrs_digest, fixed_strings, h5py_module, write_error
from pipeline.cache.match import among
from pipeline.cache.quarantine import quarantine_path
from pipeline.cache.schema import FORMAT
from pipeline.cache.store import FeatureCache, partial_dir
from pipeline.utils.config import MULTILABEL, SPLITS
from pipeline.utils.io import atomic_path, atomic_write, file_lock


def extraction_lock(final: Path, timeout: float, quiet: bool):
    """One writer per cache: a second run waits (saying so) or gives up with a clear message."""
    return file_lock(
        str(final) + ".lock",
        f"{final}: another featcache run is extracting into this cache; try again when it finishes",
        timeout=timeout,
        waiting=None if quiet else f"waiting for another featcache run on {final} ...",
        timed_out=f"{final}: still locked by another run after {timeout:.0f} s",
    )


@dataclass
class PartRows:
    """Where a digest's features live in the partial folder."""

    part: Path
    row: int


class PartWriter:
    """Appends extracted batches to ``<name>.partial/`` as whole, atomically-renamed ``.npz`` parts."""

    def __init__(self, final: Path, manifest: dict[str, Any]):
        self.dir = partial_dir(final)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.dir, e) from None
        self.manifest = dict(manifest)
        existing = sorted(self.dir.glob("part-*.npz"))
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in existing), default=0)
        self.rows_written = 0
        self._write_manifest()

    def _write_manifest(self) -> None:
        m = {**self.manifest, "rows_written": self.rows_written, "updated": time.time()}
        try:
            atomic_write(self.dir / "manifest.json", json.dumps(m))
        except OSError as e:
            raise write_error(self.dir, e) from None

    def write(self, ids: list[str], features: dict[str, np.ndarray]) -> Path:
        name = self.dir / f"part-{self._next:07d}.npz"
        tmp = self.dir / f".part-{self._next:07d}.{os.getpid()}.tmp.npz"
        arrays = {f"f_{i}": v for i, v in enumerate(features.values())}
        try:  # a part exists whole or not at all, and no temp file is left behind
            with atomic_path(name, tmp) as t:
                np.savez(
                    t,
                    ids=np.asarray(ids, dtype="U32"),
                    layers=np.asarray(list(features), dtype=str),
                    **arrays,
                )
        except OSError as e:
            raise write_error(self.dir, e) from None
        self._next += 1
        self.rows_written += len(ids)
        self._write_manifest()
        return name


class BackgroundWriter:
    """A :class:`PartWriter` on a thread, so HDF5/npz I/O overlaps the next forward pass; its first error is
    raised in the caller's thread by the next :meth:`put` or by :meth:`close`."""

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

    def put(self, ids: list[str], features: dict[str, np.ndarray]) -> None:
        if self.error:
            raise self.error
        self.q.put((ids, features))

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.error:
            raise self.error


def scan_parts(final: Path, fingerprint: str) -> dict[str, PartRows]:
    """Digest → location for every row in whole parts of *this* fingerprint; anything else is ignored."""
    d = partial_dir(final)
    found: dict[str, PartRows] = {}
    if not d.is_dir():
        return found
    with contextlib.suppress(OSError, ValueError):
        if json.loads((d / "manifest.json").read_text()).get("fingerprint") != fingerprint:
            return found  # foreign rows are never served
    for p in sorted(d.glob("part-*.npz")):
        try:
            with np.load(p) as z:
                ids = z["ids"]
        except Exception:  # noqa: BLE001 - a damaged part is skipped; its rows are re-extracted
            continue
        for i, digest in enumerate(ids):
            found[str(digest)] = PartRows(p, i)
    return found


def part_dims(parts: dict[str, PartRows]) -> dict[str, int]:
    """Layer → dimension, read off the first part (every row comes from parts and no model was built)."""
    first = next(iter(parts.values()), None)
    if first is None:
        return {}
    with np.load(first.part) as z:
        layers = [str(x) for x in z["layers"]]
        return {name: int(z[f"f_{i}"].shape[1]) for i, name in enumerate(layers)}


def clear_partial(final: Path) -> None:
    d = partial_dir(final)
    if d.is_dir():
        for p in d.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()


def remove_stale_temps(final: Path) -> None:
    """Leftovers of runs killed while writing; only ours, matched by name (and 0.1's names)."""
    q = quarantine_path(final).name
    for p in [
        *final.parent.glob(final.name + ".tmp-*"),
        *final.parent.glob(f".{q}.*.tmp*"),
        *final.parent.glob(q + ".*.tmp"),
    ]:
        with contextlib.suppress(OSError):
            p.unlink()
    d = partial_dir(final)
    if d.is_dir():
        for p in [
            *d.glob(".part-*.tmp.npz"),
            *d.glob(".manifest.json.*.tmp*"),
            *d.glob("manifest.json.*.tmp"),
        ]:
            with contextlib.suppress(OSError):
                p.unlink()


class PartReader:
    """A small LRU over parts, so rebuilding the cache reads each part about once."""

    def __init__(self, size: int = 8):
        self._cache: OrderedDict[Path, dict[str, np.ndarray]] = OrderedDict()
        self._size = size

    def get(self, loc: PartRows, layer: str) -> np.ndarray:
        arrays = self._cache.get(loc.part)
        if arrays is None:
            with np.load(loc.part) as z:
                layers = [str(x) for x in z["layers"]]
                arrays = {name: z[f"f_{i}"] for i, name in enumerate(layers)}
            self._cache[loc.part] = arrays
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(loc.part)
        return arrays[layer][loc.row]


@dataclass
class Row:
    key: str
    digest: str
    label: int | tuple[int, ...]  # class index, or a multi-label row's multi-hot tuple
    split: int
    size: int
    mtime: int


def cache_rows(ds, digests, have: set[str], skip: set[str], data_cfg, old: FeatureCache | None = None):
    """The new cache's rows in dataset order, each with its content-hashed split: every sample with a digest
    in ``have`` (cached before, or in this run's parts) but those in ``skip`` (unreadable); plus, given
    ``old`` (an accumulating cache), the rows of ``old`` that are no longer in the dataset.

    ``digests`` maps a sample key to (content digest, size, mtime)."""
    from pipeline.data.splits import SPLIT_CODES, assign_split

    label_of = ds.label_index()
    rows: list[Row] = []
    added: set[str] = set()
    for s in ds.samples:
        if s.key in skip or s.key not in digests or s.key in added:
            continue
        added.add(s.key)
        d, size, mtime = digests[s.key]
        if d not in have:
            continue  # failed during decode in this run (already unreadable)
        split = assign_split(
            d,
            fixed=s.split,
            group=s.group,
            val_fraction=data_cfg.val_fraction,
            test_fraction=data_cfg.test_fraction,
        )
        label = ds.multi_hot(s) if ds.multilabel else label_of[s.label]
        rows.append(Row(s.key, d, label, SPLIT_CODES[split], size, mtime))
    if old is not None:
        current = {r.key for r in rows}
        rows += [
            Row(k, old.ids[i], old.label_value(i), int(old.split[i]), int(old.sizes[i]), int(old.mtimes[i]))
            for i, k in enumerate(old.keys)
            if k not in current
        ]
    return rows


def write_cache(
    final: Path,
    rows: list[Row],
    class_names: list[str],
    layer_dims: dict[str, int],
    attrs: dict[str, Any],
    old: FeatureCache | None,
    parts: dict[str, PartRows],
    dtype: str = "float32",
    compression: str = "none",
    chunk_rows: int = 1024,
    donors: Sequence[FeatureCache] = (),
) -> None:
    """Build the complete cache from the previous one, the parts and ``donors`` (other caches of the same
    fingerprint, whose rows of the same content are the same features), in ``chunk_rows`` slices, atomically."""
    h5py = h5py_module()
    guard = None
    try:
        with atomic_path(final, final.with_name(f"{final.name}.tmp-{os.getpid()}"), synced=True) as tmp:
            guard = GuardedFile(tmp)
            # v1.10 formats checksum all metadata, and fletcher32 every chunk of data: a garbled file is
            # detected when read, never served (HDF5 >= 1.10 reads it)
            with h5py.File(guard, "w", libver=("v110", "v110")) as f:
                ck = {"fletcher32": True} if rows else {}
                comp = ck if compression == "none" else {"compression": compression, **ck}
                sources = [c for c in (old, *donors) if c is not None]
                _write_features(f, rows, layer_dims, sources, parts, dtype, comp, chunk_rows, guard)
                _write_columns(f, rows, class_names, attrs, ck)
            guard.close()  # fsync, and raise the first failed write, if any
    except BaseException as e:
        if guard is not None:
            guard.discard()
            e = guard.error or e
        if isinstance(e, OSError) and e.strerror:  # the file system's, not one of HDF5's own errors
            raise write_error(final, e) from None
        raise


def _write_features(f, rows: list[Row], layer_dims, sources, parts, dtype: str, comp, chunk_rows: int, guard):
    """Each layer's feature matrix, rows taken from the first of ``sources`` (cached features) that holds
    their digest, else from the parts, slice by slice."""
    n = len(rows)
    index: dict[str, tuple[int, int]] = {}  # digest → (source, row): the first source that has it wins
    wanted = np.asarray(sorted({r.digest.encode() for r in rows}), dtype="S")
    for k, cache in enumerate(sources):
        hits = np.flatnonzero(among(cache.ids.raw, wanted))  # a million cached rows: one search each
        for i, d in zip(hits.tolist(), cache.ids.raw[hits].tolist(), strict=True):
            index.setdefault(d.decode(), (k, i))
    reader = PartReader()
    g = f.create_group("features")
    for layer, dim in layer_dims.items():
        per_chunk = max(1, min(n, (1 << 20) // max(1, dim * np.dtype(dtype).itemsize)))
        g.create_dataset(layer, shape=(n, dim), dtype=dtype, chunks=(per_chunk, dim) if n else None, **comp)
    for start in range(0, n, chunk_rows):
        chunk = rows[start : start + chunk_rows]
        for layer in layer_dims:
            block = np.empty((len(chunk), layer_dims[layer]), dtype)
            for k, cache in enumerate(sources):
                _copy_rows(block, chunk, index, k, cache, layer, dtype)
            for j, r in enumerate(chunk):
                if r.digest not in index:
                    block[j] = reader.get(parts[r.digest], layer)
            g[layer][start : start + len(chunk)] = block
        guard.check()  # a failed write stops the rebuild at once


def _copy_rows(block, chunk: list[Row], index, k: int, cache: FeatureCache, layer: str, dtype: str) -> None:
    """The rows of ``chunk`` that source ``k`` serves, read from it in increasing order into ``block``."""
    mine = [(j, index[r.digest][1]) for j, r in enumerate(chunk) if index.get(r.digest, (-1,))[0] == k]
    if not mine:
        return
    js, idx = map(np.asarray, zip(*mine, strict=True))
    order = np.argsort(idx)
    uniq, inverse = np.unique(idx[order], return_inverse=True)
    block[js[order]] = cache.features(layer, uniq, dtype)[inverse]


def _write_columns(f, rows: list[Row], class_names: list[str], attrs: dict[str, Any], ck) -> None:
    """Per-row columns, class names and attributes; ``complete`` and the attributes' digest come last."""
    if attrs.get("task") == MULTILABEL:
        labels = np.asarray([r.label for r in rows], np.uint8).reshape(len(rows), len(class_names))
    else:
        labels = np.asarray([r.label for r in rows], np.int32)
    f.create_dataset("labels", data=labels, **ck)
    f.create_dataset("split", data=np.asarray([r.split for r in rows], np.uint8), **ck).attrs["names"] = (
        ",".join(SPLITS)
    )
    f.create_dataset("keys", **fixed_strings([r.key for r in rows]), **ck)
    f.create_dataset("ids", **fixed_strings([r.digest for r in rows]), **ck)
    f.create_dataset("sizes", data=np.asarray([r.size for r in rows], np.int64), **ck)
    f.create_dataset("mtimes", data=np.asarray([r.mtime for r in rows], np.int64), **ck)
    f.create_dataset("class_names", **fixed_strings(class_names), **ck)
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    f.attrs["format"] = FORMAT
    f.attrs["n_rows"] = len(rows)
    f.attrs["complete"] = True  # written last: a file without it is never served
    # HDF5 keeps many attributes in a heap it does not checksum: our own digest covers them
    f.attrs["attrs_sha256"] = attrs_digest(f.attrs)


class GuardedFile:
    """The temporary cache file as HDF5 sees it (h5py's file-object driver).

    HDF5 must never see a failed write: it then keeps its dirty metadata, retries the flush on every later
    close and at exit, and can crash the interpreter (h5py#914). So the first failure (disk full, I/O
    error...) is remembered in ``error`` and HDF5 is told the write went through; what it writes from then
    on goes to a small in-memory overlay (reads see it), which lets it close cleanly. :meth:`check` and
    :meth:`close` raise the remembered error; the caller deletes the file.
    """

    def __init__(self, path: Path):
        self._f = open(path, "w+b", buffering=0)  # closed by close() or discard()
        self.error: OSError | None = None
        self._overlay: dict[int, bytes] = {}
        self._pos = self._size = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                self._f.seek(self._pos)
                done = 0
                while done < len(view):
                    done += self._f.write(view[done:])
            except OSError as e:
                self.error = e
        if self.error is not None:
            self._overlay.pop(self._pos, None)  # re-inserted last: later writes win when patches overlap
            self._overlay[self._pos] = bytes(view)
        self._pos += len(view)
        self._size = max(self._size, self._pos)
        return len(view)

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n, start = len(view), self._pos
        self._f.seek(start)
        got = self._f.readinto(view) or 0
        view[got:] = bytes(n - got)
        for off, data in self._overlay.items():
            lo, hi = max(off, start), min(off + len(data), start + n)
            if lo < hi:
                view[lo - start : hi - start] = data[lo - off : hi - off]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        buf = bytearray(max(0, self._size - self._pos) if size is None or size < 0 else size)
        self.readinto(buf)
        return bytes(buf)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._f.truncate(size)
            except OSError as e:
                self.error = e
        self._size = size
        return size

    def flush(self) -> None:
        pass

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.check()
        try:
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
