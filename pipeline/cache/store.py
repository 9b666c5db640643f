"""Reading the HDF5 feature cache: a complete file opened read-only and validated (format, completeness,
checksums) before any row is served; the names of a cache's files, and the listing of a cache folder.

What a cache file holds and which attributes it carries: :mod:`pipeline.cache.schema`; how it is written
(crash-safe, never in place): :mod:`pipeline.cache.write`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.h5 import attr_value, attrs_digest, h5py_module, short_error, to_str
from pipeline.cache.schema import FORMAT
from pipeline.cache.segments import StackedRows, base_generation, chain, segment_files
from pipeline.utils.config import MULTILABEL, SPLITS
from pipeline.utils.errors import FeatcacheError


def cache_stem(dataset: str, backbone: str, fingerprint: str, source_tag: str = "") -> str:
    """``<dataset>-<source tag>-<backbone>-<fingerprint>``: the source's tag keeps two sources named alike
    apart (caches written before 0.3 have none: ``<dataset>-<backbone>-<fingerprint>``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "data"
    tag = f"-{source_tag}" if source_tag else ""
    return f"{safe}{tag}-{backbone}-{fingerprint[:12]}"


def partial_dir(final: Path) -> Path:
    return final.with_name(final.stem + ".partial")


class Strings(Sequence):
    """A column of strings (keys, content ids) kept as one fixed-width UTF-8 array: a million rows take
    their bytes, not a million Python objects; a row is decoded when asked for."""

    def __init__(self, raw: np.ndarray):
        if raw.dtype.kind != "S":  # variable-length strings (caches written before 0.2)
            raw = (
                np.asarray([to_str(v).encode("utf-8") for v in raw], dtype="S")
                if len(raw)
                else raw.astype("S1")
            )
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.raw[i].decode("utf-8")
        return [v.decode("utf-8") for v in self.raw[i].tolist()]

    def __iter__(self):
        return (v.decode("utf-8") for v in self.raw.tolist())

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Strings({len(self)} rows)"


def _open_checked(path: Path):
    """``path`` opened read-only once its format, completeness and metadata checksum are verified."""
    h5py = h5py_module()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FeatcacheError(
            f"{path}: not a readable HDF5 cache ({short_error(e)}); delete it or re-extract with --rebuild"
        ) from None
    try:
        a = f.attrs
        digest = a.get("attrs_sha256")
        checksummed = digest is not None or ("ids" in f and f["ids"].fletcher32)
        if checksummed and digest != attrs_digest(a):
            raise FeatcacheError(f"{path}: damaged cache (metadata checksum); re-extract with --rebuild")
        if a.get("format") != FORMAT:
            raise FeatcacheError(
                f"{path}: not a featcache cache (format {a.get('format')!r}); delete it or re-extract"
                " with --rebuild"
            )
        if not bool(a.get("complete", False)):
            raise FeatcacheError(f"{path}: cache is incomplete; run `featcache extract` again to finish it")
    except FeatcacheError:
        f.close()
        raise
    except (KeyError, OSError, ValueError, RuntimeError) as e:
        f.close()
        raise FeatcacheError(f"{path}: damaged cache ({short_error(e)}); re-extract with --rebuild") from None
    return f


#: bytes one slice covers at most (at least one chunk): memory beyond the result stays at one span, and
#: reading 800k of 1M rows × 1280 through spans of 8 MB took as long as through 335 MB ones
SPAN_BYTES = 8 << 20


def _read_rows(ds, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = ds[rows[i]]`` (any order, repeats allowed), span by span: as one slice where the rows
    are more than twice the chunks the span touches, else as h5py's point selection.

    A point selection costs about one chunk read per row that lands in another chunk, a slice one per
    chunk: on a 1M × 1280 float32 cache (2 shared cores, warm), 65,536 consecutive rows took 1.5 s as a
    slice and 3.7 s as an index list; 20,000 sorted random rows 53 s as an index list, 10–15 s as slices."""
    chunk = (getattr(ds, "chunks", None) or (1,))[0]
    span = max(chunk, SPAN_BYTES // max(int(np.prod(ds.shape[1:])) * ds.dtype.itemsize, 1))
    ordered = bool(np.all(rows[1:] > rows[:-1]))  # the usual case: written in place, no scatter
    order = np.arange(len(rows)) if ordered else np.argsort(rows, kind="stable")
    s = rows if ordered else rows[order]
    i = 0
    while i < len(s):
        j = int(np.searchsorted(s, s[i] + span, "left"))
        lo, hi = int(s[i]), int(s[j - 1]) + 1
        if ordered and hi - lo == j - i:
            _read_slice(ds, lo, hi, out[i:j])
        elif j - i > 2 * (hi - lo) / chunk:
            block = ds[lo:hi]
            if ordered:
                take_rows(block, s[i:j] - lo, out[i:j])
            else:
                out[order[i:j]] = block[s[i:j] - lo]
        else:
            uniq, inverse = np.unique(s[i:j], return_inverse=True)
            out[order[i:j]] = ds[uniq][inverse]
        i = j


def take_rows(block: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = block[rows]`` for rows known in range. ``np.take``'s default ``mode="raise"`` copies
    into a temporary ``out``-sized buffer first: at 1M × 1280, gathering a run's rows out of 8 MB slices
    took 5–11.6 s that way, 3.7 s straight into ``out``."""
    np.take(block, rows, axis=0, out=out, mode="clip")


def _read_slice(ds, lo: int, hi: int, out: np.ndarray) -> None:
    """``out[:] = ds[lo:hi]``, straight into ``out`` where h5py can (same dtype): every row of a 1M × 1280
    cache in 2.6 s warm, against 18 s through a temporary and a scatter."""
    if hasattr(ds, "read_direct") and ds.dtype == out.dtype:
        ds.read_direct(out, np.s_[lo:hi])
    else:
        out[:] = ds[lo:hi]


#: attributes that describe one segment, not the cache it extends
SEGMENT_ATTRS = ("segment_of", "segment_first", "segment_last", "attrs_sha256")


class FeatureCache:
    """A complete cache opened read-only: the base file and the segments later runs added
    (:mod:`pipeline.cache.segments`). Small columns load eagerly; features stay on disk until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatcacheError(f"cache not found: {self.path}")
        self._f = _open_checked(self.path)
        self._files = [self._f]
        self.segments: list[Path] = []  # the segment files served after the base, in order
        self.generation: str | None = None  # what a segment names to extend the base
        self.last_run = 0  # the growth run the last segment served ends with (the next one is +1)
        try:
            self.meta: dict[str, Any] = {k: attr_value(v) for k, v in self._f.attrs.items()}
            self._open_segments()
            self._load_columns()
        except FeatcacheError:
            self.close()
            raise
        except (KeyError, OSError, ValueError, RuntimeError) as e:  # h5py raises any of these on damage
            self.close()
            raise self._damaged(e) from None

    def _open_segments(self) -> None:
        """The chain of segments extending this base; a segment vanishing under us (a writer's clean-up
        after a merge) means listing again."""
        self.generation = generation = base_generation(self.meta)
        if generation is None:
            return
        for _ in range(3):
            opened: dict[Path, Any] = {}

            def belongs(s, opened=opened) -> bool:
                f = _open_checked(s.path)
                if attr_value(f.attrs.get("segment_of")) != generation:
                    f.close()
                    return False
                opened[s.path] = f
                return True

            try:
                served = chain(segment_files(self.path), belongs)
            except FeatcacheError:
                for f in opened.values():
                    f.close()
                if all(s.path.exists() for s in segment_files(self.path)):
                    raise
                continue
            for s in served:
                self._files.append(opened.pop(s.path))
                self.segments.append(s.path)
                self.last_run = s.last
            for f in opened.values():
                f.close()
            if self.segments:
                last = {k: attr_value(v) for k, v in self._files[-1].attrs.items()}
                self.meta.update({k: v for k, v in last.items() if k not in SEGMENT_ATTRS})
            return

    def _load_columns(self) -> None:
        files = self._files
        self.layers: list[str] = list(self._f["features"].keys())
        self.class_names = [to_str(c) for c in self._f["class_names"][()]]
        for f in files[1:]:
            names = [to_str(c) for c in f["class_names"][()]]
            dims = {k: f["features"][k].shape[1:] for k in f["features"]}
            if names != self.class_names or dims != {
                k: self._f["features"][k].shape[1:] for k in self.layers
            }:
                raise FeatcacheError(
                    f"{f.filename}: segment disagrees with its cache; re-extract with --rebuild"
                )

        def column(name: str) -> np.ndarray:
            parts = [f[name][()] for f in files]
            return np.concatenate(parts) if len(parts) > 1 else parts[0]

        labels = column("labels")
        self.labels = labels.astype(np.uint8 if self.multilabel else np.int64)
        self.split = column("split")
        self.keys = Strings(column("keys"))
        self.ids = Strings(column("ids"))
        self.sizes = column("sizes")
        self.mtimes = column("mtimes")
        n = len(self.keys)
        self.meta["n_rows"] = n
        self.base_rows = int(self._f["keys"].shape[0])  # the rows before the segments
        for layer in self.layers:
            got = sum(f["features"][layer].shape[0] for f in files)
            if got != n:
                raise FeatcacheError(f"{self.path}: features/{layer} has {got} rows, expected {n}")
        if not (len(self.labels) == len(self.split) == len(self.ids) == n):
            raise FeatcacheError(f"{self.path}: columns disagree in length; the file is damaged")

    # -- small, convenient accessors
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def n_rows(self) -> int:
        return len(self.keys)

    @property
    def multilabel(self) -> bool:
        """Whether ``labels`` is an N×C multi-hot matrix (``task`` attribute) rather than N class indices."""
        return self.meta.get("task") == MULTILABEL

    def label_value(self, i: int) -> int | tuple[int, ...]:
        """Row ``i``'s label as the writer takes it: a class index, or a multi-hot tuple."""
        return tuple(int(v) for v in self.labels[i]) if self.multilabel else int(self.labels[i])

    def file_stats(self) -> dict[str, tuple[int, int, str]]:
        """key → (size, mtime, digest) of every row: a rerun does not re-read a file whose stat matches."""
        return {
            k: (int(s), int(m), d)
            for k, s, m, d in zip(self.keys, self.sizes, self.mtimes, self.ids, strict=True)
        }

    def default_layer(self) -> str:
        return self.layers[0]

    def layer_name(self, layer: str | None) -> str:
        if not layer:
            return self.default_layer()
        if layer not in self.layers:
            raise FeatcacheError(
                f"{self.path}: no layer {layer!r} in this cache (has {', '.join(self.layers)})"
            )
        return layer

    def dataset(self, layer: str | None = None):
        """The feature matrix as streaming readers slice it: the h5py dataset itself, or the base and its
        segments stacked (:class:`~pipeline.cache.segments.StackedRows`)."""
        name = self.layer_name(layer)
        if len(self._files) == 1:
            return self._f["features"][name]
        return StackedRows([f["features"][name] for f in self._files])

    def rows(self, split: str | None = None) -> np.ndarray:
        """The row indices of a split (``train``, ``val`` or ``test``); every row when None."""
        if split is None:
            return np.arange(self.n_rows)
        if split not in SPLITS:
            raise FeatcacheError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
        return np.flatnonzero(self.split == SPLITS.index(split))

    def xy(self, split: str | None = None, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``X, y`` of a split in one call: float32 features (N×D, of ``layer``, default the first) and the
        class indices into :attr:`class_names` (a multi-label cache: the N×C multi-hot rows); every row when
        ``split`` is None."""
        rows = self.rows(split)
        return self.features(layer, rows), self.labels[rows]

    def features(
        self,
        layer: str | None = None,
        rows: np.ndarray | None = None,
        dtype=np.float32,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Features of ``rows`` (every row when None), in that order; written into ``out`` when given."""
        ds = self.dataset(layer)
        try:
            if rows is None:
                return ds[()].astype(dtype, copy=False)
            rows = np.asarray(rows, np.int64)
            if out is None:
                out = np.empty((len(rows), ds.shape[1]), dtype)
            if rows.size:
                _read_rows(ds, rows, out)
            return out
        except OSError as e:  # a failed checksum, a cut-off chunk...
            raise self._damaged(e) from None

    def _damaged(self, e: Exception) -> FeatcacheError:
        return FeatcacheError(f"{self.path}: damaged cache ({short_error(e)}); re-extract with --rebuild")

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

    def info(self) -> dict[str, Any]:
        """What ``featcache cache info`` prints: rows, layers and their shapes, classes, split sizes, metadata."""
        return {
            "path": str(self.path),
            "rows": self.n_rows,
            "segments": len(self.segments),
            "layers": {layer: list(self.dataset(layer).shape) for layer in self.layers},
            "classes": self.class_names,
            "split_counts": {name: int((self.split == i).sum()) for i, name in enumerate(SPLITS)},
            **{k: v for k, v in self.meta.items() if k not in ("complete",)},
        }

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, rows={self.n_rows}, layers={self.layers})"


def open_cache(path: str | Path) -> FeatureCache:
    return FeatureCache(path)


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
            with contextlib.suppress(OSError):  # a segment merged away since it was opened
                info["size"] += sum(p.stat().st_size for p in c.segments)
            info.update(
                status="complete",
                rows=c.n_rows,
                backbone=c.meta.get("backbone"),
                dataset=c.meta.get("dataset"),
                source=c.meta.get("source_id") or c.meta.get("source"),
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
