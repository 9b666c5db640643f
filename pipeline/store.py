"""The HDF5 feature cache: crash-safe writing, validated reading.

Layout of a complete cache ``<name>.h5`` (readable with plain h5py or ``h5dump``)::

    /features/<layer>   N×D float32|float16, chunked   one dataset per extracted layer
    /labels             N int32                         index into /class_names
    /class_names        C str
    /split              N uint8                         0 train, 1 val, 2 test (attr ``names``)
    /keys               N str                           sample path relative to the dataset root
    /ids                N str                           content digest of the sample
    /sizes, /mtimes     N int64                         file stat, so a rerun need not re-read files
    attrs: format, complete, fingerprint, feature_key, backbone, weights, layers, pooling, image_size,
           resize, dtype, engine, dataset, source, versions, config, created

Writing never touches a complete cache in place. Extracted batches go to ``<name>.partial/part-*.npz``
(each written to a temp name, then renamed: a part exists whole or not at all), and the complete file is
rebuilt as ``<name>.h5.tmp-*`` and renamed over the old one. ``kill -9`` at any moment leaves either the
old complete cache plus whole parts, so the next run resumes, or the new complete cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FeatcacheError
from .splits import SPLIT_NAMES

FORMAT = "featcache/1"
_STR = None  # h5py string dtype, created lazily


def _h5():
    import h5py

    return h5py


def _str_dtype():
    global _STR
    if _STR is None:
        _STR = _h5().string_dtype("utf-8")
    return _STR


def cache_stem(dataset: str, backbone: str, fingerprint: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "data"
    return f"{safe}-{backbone}-{fingerprint[:12]}"


def partial_dir(final: Path) -> Path:
    return final.with_name(final.stem + ".partial")


def quarantine_path(final: Path) -> Path:
    return final.with_name(final.stem + ".quarantine.csv")


# --------------------------------------------------------------------------------------------- reading


class FeatureCache:
    """A complete cache opened read-only. Small columns load eagerly; features stay on disk until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        h5py = _h5()
        if not self.path.is_file():
            raise FeatcacheError(f"cache not found: {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise FeatcacheError(
                f"{self.path}: not a readable HDF5 cache ({_short(e)}); delete it or re-extract with --rebuild"
            ) from None
        try:
            a = self._f.attrs
            digest = a.get("attrs_sha256")
            checksummed = digest is not None or ("ids" in self._f and self._f["ids"].fletcher32)
            if checksummed and digest != _attrs_digest(a):
                raise FeatcacheError(
                    f"{self.path}: damaged cache (metadata checksum); re-extract with --rebuild"
                )
            if a.get("format") != FORMAT:
                raise FeatcacheError(
                    f"{self.path}: not a featcache cache (format {a.get('format')!r}); delete it or re-extract"
                    " with --rebuild"
                )
            if not bool(a.get("complete", False)):
                raise FeatcacheError(
                    f"{self.path}: cache is incomplete; run `featcache extract` again to finish it"
                )
            self.meta: dict[str, Any] = {k: _attr(v) for k, v in a.items()}
            self.layers: list[str] = list(self._f["features"].keys())
            self.class_names = [_s(c) for c in self._f["class_names"][()]]
            self.labels = self._f["labels"][()].astype(np.int64)
            self.split = self._f["split"][()]
            self.keys = [_s(k) for k in self._f["keys"][()]]
            self.ids = [_s(k) for k in self._f["ids"][()]]
            self.sizes = self._f["sizes"][()]
            self.mtimes = self._f["mtimes"][()]
            n = len(self.keys)
            for layer in self.layers:
                if self._f["features"][layer].shape[0] != n:
                    raise FeatcacheError(
                        f"{self.path}: features/{layer} has {self._f['features'][layer].shape[0]} rows, expected {n}"
                    )
            if not (len(self.labels) == len(self.split) == len(self.ids) == n):
                raise FeatcacheError(f"{self.path}: columns disagree in length; the file is damaged")
        except FeatcacheError:
            self._f.close()
            raise
        except (KeyError, OSError, ValueError, RuntimeError) as e:  # h5py raises any of these on damage
            self._f.close()
            raise FeatcacheError(
                f"{self.path}: damaged cache ({_short(e)}); re-extract with --rebuild"
            ) from None

    # -- small, convenient accessors
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def n_rows(self) -> int:
        return len(self.keys)

    def default_layer(self) -> str:
        return self.layers[0]

    def _layer(self, layer: str | None) -> str:
        if not layer:
            return self.default_layer()
        if layer not in self.layers:
            raise FeatcacheError(
                f"{self.path}: no layer {layer!r} in this cache (has {', '.join(self.layers)})"
            )
        return layer

    def dataset(self, layer: str | None = None):
        """The h5py dataset itself, for streaming readers."""
        return self._f["features"][self._layer(layer)]

    def rows(self, split: str | None = None) -> np.ndarray:
        if split is None:
            return np.arange(self.n_rows)
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split))

    def features(
        self, layer: str | None = None, rows: np.ndarray | None = None, dtype=np.float32
    ) -> np.ndarray:
        ds = self.dataset(layer)
        try:
            if rows is None:
                return ds[()].astype(dtype, copy=False)
            rows = np.asarray(rows)
            if rows.size == 0:
                return np.zeros((0, ds.shape[1]), dtype)
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows), ds.shape[1]), dtype)
            out[order] = ds[rows[order]]  # h5py wants increasing indices
            return out
        except OSError as e:  # a failed checksum, a cut-off chunk...
            raise self._damaged(e) from None

    def _damaged(self, e: Exception) -> FeatcacheError:
        return FeatcacheError(f"{self.path}: damaged cache ({_short(e)}); re-extract with --rebuild")

    def iter_batches(
        self, layer: str | None = None, rows: np.ndarray | None = None, batch_size: int = 1024
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features, labels) in chunks: memory stays bounded by ``batch_size`` rows."""
        rows = np.arange(self.n_rows) if rows is None else np.sort(np.asarray(rows))
        ds = self.dataset(layer)
        for i in range(0, len(rows), batch_size):
            r = rows[i : i + batch_size]
            try:
                block = ds[r].astype(np.float32, copy=False)
            except OSError as e:
                raise self._damaged(e) from None
            yield block, self.labels[r]

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, rows={self.n_rows}, layers={self.layers})"


def open_cache(path: str | Path) -> FeatureCache:
    return FeatureCache(path)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _s(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "{[":
        with contextlib.suppress(ValueError):
            return json.loads(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------------------------- listing


def describe(path: Path) -> dict[str, Any]:
    """One line's worth of facts about a cache file or a partial one, never raising."""
    info: dict[str, Any] = {"path": str(path), "size": 0, "status": "?", "rows": 0}
    if path.suffix == ".partial":
        parts = sorted(path.glob("part-*.npz"))
        info.update(status="partial", size=sum(p.stat().st_size for p in parts))
        man = path / "manifest.json"
        with contextlib.suppress(OSError, ValueError):
            m = json.loads(man.read_text())
            info.update(backbone=m.get("backbone"), dataset=m.get("dataset"), rows=m.get("rows_written", 0))
        return info
    info["size"] = path.stat().st_size
    try:
        with FeatureCache(path) as c:
            info.update(
                status="complete",
                rows=c.n_rows,
                backbone=c.meta.get("backbone"),
                dataset=c.meta.get("dataset"),
                layers=c.layers,
            )
    except FeatcacheError as e:
        info.update(
            status="damaged" if "damaged" in str(e) or "not a readable" in str(e) else "incomplete",
            error=str(e),
        )
    return info


def list_caches(cache_dir: str | Path) -> list[dict[str, Any]]:
    d = Path(cache_dir)
    if not d.is_dir():
        return []
    out = [describe(p) for p in sorted(d.glob("*.h5"))]
    out += [describe(p) for p in sorted(d.glob("*.partial")) if p.is_dir() and any(p.glob("part-*.npz"))]
    return out


# --------------------------------------------------------------------------------------------- writing


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
        tmp = self.dir / f"manifest.json.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(m))
            os.replace(tmp, self.dir / "manifest.json")
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise write_error(self.dir, e) from None

    def write(self, ids: list[str], features: dict[str, np.ndarray]) -> Path:
        name = self.dir / f"part-{self._next:07d}.npz"
        tmp = self.dir / f".part-{self._next:07d}.{os.getpid()}.tmp.npz"
        arrays = {f"f_{i}": v for i, v in enumerate(features.values())}
        try:
            np.savez(
                tmp, ids=np.asarray(ids, dtype="U32"), layers=np.asarray(list(features), dtype=str), **arrays
            )
            os.replace(tmp, name)
        except BaseException as e:  # a part exists whole or not at all, and no temp file is left behind
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(e, OSError):
                raise write_error(self.dir, e) from None
            raise
        self._next += 1
        self.rows_written += len(ids)
        self._write_manifest()
        return name


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


def clear_partial(final: Path) -> None:
    d = partial_dir(final)
    if d.is_dir():
        for p in d.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()


def remove_stale_temps(final: Path) -> None:
    """Leftovers of runs killed while writing; only ours, matched by name."""
    for p in [
        *final.parent.glob(final.name + ".tmp-*"),
        *final.parent.glob(quarantine_path(final).name + ".*.tmp"),
    ]:
        with contextlib.suppress(OSError):
            p.unlink()
    d = partial_dir(final)
    if d.is_dir():
        for p in d.glob(".part-*.tmp.npz"):
            with contextlib.suppress(OSError):
                p.unlink()


class _PartReader:
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
    label: int
    split: int
    size: int
    mtime: int


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
) -> None:
    """Build the complete cache from the previous one and the parts, in ``chunk_rows`` slices, atomically."""
    h5py = _h5()
    old_index = {d: i for i, d in enumerate(old.ids)} if old is not None else {}
    reader = _PartReader()
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    n = len(rows)
    guard = None
    try:
        guard = _GuardedFile(tmp)
        # v1.10 formats checksum all metadata, and fletcher32 every chunk of data: a garbled file is
        # detected when read, never served (HDF5 >= 1.10 reads it)
        with h5py.File(guard, "w", libver=("v110", "v110")) as f:
            g = f.create_group("features")
            ck = {"fletcher32": True} if n else {}
            comp = ck if compression == "none" else {"compression": compression, **ck}
            for layer, dim in layer_dims.items():
                per_chunk = max(1, min(n, (1 << 20) // max(1, dim * np.dtype(dtype).itemsize)))
                g.create_dataset(
                    layer, shape=(n, dim), dtype=dtype, chunks=(per_chunk, dim) if n else None, **comp
                )
            for start in range(0, n, chunk_rows):
                chunk = rows[start : start + chunk_rows]
                for layer in layer_dims:
                    block = np.empty((len(chunk), layer_dims[layer]), dtype)
                    from_old = [
                        (j, old_index[r.digest]) for j, r in enumerate(chunk) if r.digest in old_index
                    ]
                    if from_old:
                        js, idx = map(np.asarray, zip(*from_old, strict=True))
                        order = np.argsort(idx)
                        uniq, inverse = np.unique(idx[order], return_inverse=True)
                        data = old.features(layer, uniq, dtype)
                        block[js[order]] = data[inverse]
                    for j, r in enumerate(chunk):
                        if r.digest not in old_index:
                            block[j] = reader.get(parts[r.digest], layer)
                    g[layer][start : start + len(chunk)] = block
                guard.check()  # a failed write stops the rebuild at once
            f.create_dataset("labels", data=np.asarray([r.label for r in rows], np.int32), **ck)
            f.create_dataset("split", data=np.asarray([r.split for r in rows], np.uint8), **ck).attrs[
                "names"
            ] = ",".join(SPLIT_NAMES)
            f.create_dataset("keys", **_fixed_strings([r.key for r in rows]), **ck)
            f.create_dataset("ids", **_fixed_strings([r.digest for r in rows]), **ck)
            f.create_dataset("sizes", data=np.asarray([r.size for r in rows], np.int64), **ck)
            f.create_dataset("mtimes", data=np.asarray([r.mtime for r in rows], np.int64), **ck)
            f.create_dataset("class_names", **_fixed_strings(class_names), **ck)
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
            f.attrs["format"] = FORMAT
            f.attrs["n_rows"] = n
            f.attrs["complete"] = True  # written last: a file without it is never served
            # HDF5 keeps many attributes in a heap it does not checksum: our own digest covers them
            f.attrs["attrs_sha256"] = _attrs_digest(f.attrs)
        guard.close()  # fsync, and raise the first failed write, if any
        os.replace(tmp, final)
        with contextlib.suppress(OSError):
            dfd = os.open(final.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
    except BaseException as e:
        if guard is not None:
            guard.discard()
            e = guard.error or e
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.strerror:  # the file system's, not one of HDF5's own errors
            raise write_error(final, e) from None
        raise


def write_error(path: Path, e: BaseException) -> FeatcacheError:
    """A failed write (disk full, permission denied, read-only folder...) as one clear line."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:  # HDF5: "... errno = 28, error message = 'No space left on device', ..."
        m = re.search(r"error message = '([^']*)'", str(e))
        reason = m.group(1) if m else _short(e)
    return FeatcacheError(
        f"cannot write {path}: {reason} (any previous complete cache is untouched; fix this and run again)"
    )


def _attrs_digest(attrs) -> str:
    h = hashlib.sha256()
    for k in sorted(attrs):
        if k != "attrs_sha256":
            h.update(f"{k}\0{_attr(attrs[k])!r}\0".encode())
    return h.hexdigest()


def _fixed_strings(values: list[str]) -> dict[str, Any]:
    """Fixed-length UTF-8: stored in the dataset itself, so its checksum covers it (a variable-length
    string lives in an unchecksummed global heap)."""
    encoded = [v.encode("utf-8") for v in values]
    width = max(1, *map(len, encoded)) if encoded else 1
    return {"data": np.asarray(encoded, dtype=f"S{width}").astype(_h5().string_dtype("utf-8", width))}


class _GuardedFile:
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
