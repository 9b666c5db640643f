"""A FAISS index kept beside its cache: ``<cache>.<layer>.index/`` holds ``index.faiss``, ``rows.npy``
(the identity of each indexed row, in FAISS id order) and ``meta.json`` (the cache's fingerprint, the
layer, the kind, and the sha256 of both files).

The folder is written whole through :func:`pipeline.utils.io.atomic_path` (a temporary folder renamed
over the old one), so a killed build leaves the old index or none, never half of one. What is read back
is checked before it is served: its checksums (a damaged file), its fingerprint and layer (an index of
another cache) and its rows (a stale index: rows of the cache changed). A row's identity is its key and
content digest, so a later ``extract`` that only added rows is caught up by adding those rows.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.io import atomic_path, read_json, remove_dead_temps, sha256_file, write_json

FORMAT = "featcache-index-1"


def index_dir(cache_path: str | Path, layer: str) -> Path:
    """``<cache stem>.<layer>.index`` beside the cache file."""
    cache_path = Path(cache_path)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", layer)
    return cache_path.with_name(f"{cache_path.stem}.{safe}.index")


def row_identities(keys: list[str], ids: list[str]) -> np.ndarray:
    """One uint64 per row: the first 8 bytes of sha256(key, content digest)."""
    if len(keys) != len(ids):
        raise ValueError(f"{len(keys)} keys, {len(ids)} ids")
    sha = hashlib.sha256
    digests = b"".join(sha(f"{k}\0{d}".encode()).digest()[:8] for k, d in zip(keys, ids, strict=True))
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


@dataclass
class Stored:
    """An index read back and checked: the FAISS object, its rows' identities, its meta.json."""

    index: Any
    rows: np.ndarray
    meta: dict[str, Any]


def save(folder: Path, index, rows: np.ndarray, meta: dict[str, Any]) -> None:
    """Write the index folder atomically (the whole folder or nothing)."""
    import faiss

    remove_dead_temps(folder)  # a build killed before: its half-written folder goes now
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "rows.npy", np.asarray(rows, np.uint64))
        sums = {name: sha256_file(tmp / name) for name in ("index.faiss", "rows.npy")}
        write_json(tmp / "meta.json", {**meta, "format": FORMAT, "ntotal": int(index.ntotal), "sha256": sums})


def load(folder: Path, expect: dict[str, Any]) -> tuple[Stored | None, str]:
    """The index in ``folder`` if it is whole and made for ``expect`` (fingerprint, layer, dim), else
    (None, why it cannot be served); (None, "") when there is none."""
    if not folder.exists():
        return None, ""
    meta = read_json(folder / "meta.json")
    if not meta or meta.get("format") != FORMAT:
        return None, "damaged (no readable meta.json)"
    for key, value in expect.items():
        if meta.get(key) != value:
            return None, f"made for another cache ({key} {meta.get(key)!r}, this cache {value!r})"
    sums = meta.get("sha256") or {}
    for name in ("index.faiss", "rows.npy"):
        if not (folder / name).is_file() or sha256_file(folder / name) != sums.get(name):
            return None, f"damaged ({name} does not match its checksum)"
    import faiss

    try:
        index = faiss.read_index(str(folder / "index.faiss"))
        rows = np.load(folder / "rows.npy", allow_pickle=False)
    except (RuntimeError, ValueError, OSError) as e:
        return None, f"damaged ({str(e).splitlines()[0][:120]})"
    if index.ntotal != len(rows) or index.d != expect.get("dim", index.d):
        return None, "damaged (its rows disagree with its vectors)"
    return Stored(index, rows, meta), ""
