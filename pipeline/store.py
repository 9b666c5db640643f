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
            if a.get("format") != FORMAT:
                raise FeatcacheError(f"{self.path}: not a featcache cache (format {a.get('format')!r})")
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
        except (KeyError, OSError, ValueError) as e:
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
        if rows is None:
            return ds[()].astype(dtype, copy=False)
        rows = np.asarray(rows)
        if rows.size == 0:
            return np.zeros((0, ds.shape[1]), dtype)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), ds.shape[1]), dtype)
        out[order] = ds[rows[order]]  # h5py wants increasing indices
        return out

    def iter_batches(
        self, layer: str | None = None, rows: np.ndarray | None = None, batch_size: int = 1024
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features, labels) in chunks: memory stays bounded by ``batch_size`` rows."""
        rows = np.arange(self.n_rows) if rows is None else np.sort(np.asarray(rows))
        ds = self.dataset(layer)
        for i in range(0, len(rows), batch_size):
            r = rows[i : i + batch_size]
            yield ds[r].astype(np.float32, copy=False), self.labels[r]

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
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = dict(manifest)
        existing = sorted(self.dir.glob("part-*.npz"))
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in existing), default=0)
        self.rows_written = 0
        self._write_manifest()

    def _write_manifest(self) -> None:
        m = {**self.manifest, "rows_written": self.rows_written, "updated": time.time()}
        tmp = self.dir / f"manifest.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(m))
        os.replace(tmp, self.dir / "manifest.json")

    def write(self, ids: list[str], features: dict[str, np.ndarray]) -> Path:
        name = self.dir / f"part-{self._next:07d}.npz"
        tmp = self.dir / f".part-{self._next:07d}.{os.getpid()}.tmp.npz"
        arrays = {f"f_{i}": v for i, v in enumerate(features.values())}
        np.savez(
            tmp, ids=np.asarray(ids, dtype="U32"), layers=np.asarray(list(features), dtype=str), **arrays
        )
        os.replace(tmp, name)
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
    for p in final.parent.glob(final.name + ".tmp-*"):
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
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("features")
            comp = {} if compression == "none" else {"compression": compression}
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
                        data = old.dataset(layer)[uniq]
                        block[js[order]] = data[inverse]
                    for j, r in enumerate(chunk):
                        if r.digest not in old_index:
                            block[j] = reader.get(parts[r.digest], layer)
                    g[layer][start : start + len(chunk)] = block
            f.create_dataset("labels", data=np.asarray([r.label for r in rows], np.int32))
            f.create_dataset("split", data=np.asarray([r.split for r in rows], np.uint8)).attrs["names"] = (
                ",".join(SPLIT_NAMES)
            )
            f.create_dataset("keys", data=np.asarray([r.key for r in rows], dtype=object), dtype=_str_dtype())
            f.create_dataset(
                "ids", data=np.asarray([r.digest for r in rows], dtype=object), dtype=_str_dtype()
            )
            f.create_dataset("sizes", data=np.asarray([r.size for r in rows], np.int64))
            f.create_dataset("mtimes", data=np.asarray([r.mtime for r in rows], np.int64))
            f.create_dataset("class_names", data=np.asarray(class_names, dtype=object), dtype=_str_dtype())
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
            f.attrs["format"] = FORMAT
            f.attrs["n_rows"] = n
            f.attrs["complete"] = True  # written last: a file without it is never served
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        with contextlib.suppress(OSError):
            dfd = os.open(final.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
