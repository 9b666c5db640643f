"""Low-level HDF5 helpers shared by the cache's reader and writer: h5py on demand, attributes, errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.errors import FeatcacheError


def h5py_module():
    import h5py

    return h5py


def short_error(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def to_str(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def attr_value(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "{[":
        with contextlib.suppress(ValueError):
            return json.loads(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_error(path: Path, e: BaseException) -> FeatcacheError:
    """A failed write (disk full, permission denied, read-only folder...) as one clear line."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:  # HDF5: "... errno = 28, error message = 'No space left on device', ..."
        m = re.search(r"error message = '([^']*)'", str(e))
        reason = m.group(1) if m else short_error(e)
    return FeatcacheError(
        f"cannot write {path}: {reason} (any previous complete cache is untouched; fix this and run again)"
    )


def attrs_digest(attrs) -> str:
    h = hashlib.sha256()
    for k in sorted(attrs):
        if k != "attrs_sha256":
            h.update(f"{k}\0{attr_value(attrs[k])!r}\0".encode())
    return h.hexdigest()


def fixed_strings(values: list[str]) -> dict[str, Any]:
    """Fixed-length UTF-8: stored in the dataset itself, so its checksum covers it (a variable-length
    string lives in an unchecksummed global heap)."""
    encoded = [v.encode("utf-8") for v in values]
    width = max(1, *map(len, encoded)) if encoded else 1
    return {"data": np.asarray(encoded, dtype=f"S{width}").astype(h5py_module().string_dtype("utf-8", width))}
