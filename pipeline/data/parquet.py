"""Parquet in the Hugging Face layout: an ``image`` column (struct{bytes, path} or plain bytes), a ``label``
column, class names from the ``ClassLabel`` in the ``huggingface`` schema metadata, an optional ``split``.

Listing iterates record batches (only the columns it needs) and keeps the digests, never the bytes; reading
an image back loads only its row group's ``image`` column, keeping one row group per open file, so a
sequential decode pass reads each row group once and memory stays bounded by a row group.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from collections import OrderedDict

from pipeline.data.decode import DecodeError
from pipeline.data.storage import digest_bytes, open_file, storage_reason
from pipeline.utils.errors import FeatcacheError

BATCH_ROWS = 256
OPEN_FILES = 4
_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


def class_names_from_metadata(metadata: dict | None) -> list[str] | None:
    """The ``label`` ClassLabel's names from the ``huggingface`` schema metadata, if any."""
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    features = (info.get("info") or {}).get("features") or info.get("features") or {}
    label = features.get("label") if isinstance(features, dict) else None
    if label is None and isinstance(features, dict) and isinstance(features.get("labels"), dict):
        label = features["labels"].get("feature")  # Sequence(ClassLabel) of a multi-label ``labels`` column
    if isinstance(label, dict) and isinstance(label.get("names"), list):
        return [str(n) for n in label["names"]]
    return None


def image_bytes(value) -> bytes | str:
    """Bytes from an ``image`` cell (struct{bytes, path} or plain bytes), or the reason there are none."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if not data:
            path = value.get("path")
            return f"image has no bytes (path {path!r} only)" if path else "no image (null image cell)"
        return data
    if not value:
        return "no image (null image cell)"
    return value


def _label(value, names: list[str] | None) -> tuple[str, bool] | str:
    if value is None:
        return "no label (null label cell)"
    if isinstance(value, bool):
        return f"bad label {value!r}"
    if isinstance(value, int):
        if names is not None:
            if not 0 <= value < len(names):
                return f"label {value} outside the ClassLabel's {len(names)} names"
            return names[value], False
        if value < 0:
            return f"label {value} is negative"
        return str(value), True
    text = str(value).strip()
    return (text, False) if text else "no label (empty label cell)"


def _labels(values, names: list[str] | None) -> tuple[list[str], bool] | str:
    """A multi-label ``labels`` cell (a list of ClassLabel indices or names; empty: no label)."""
    if values is None:
        return [], False
    got = [_label(v, names) for v in values]
    bad = next((g for g in got if isinstance(g, str)), None)
    return bad if bad is not None else (sorted({g[0] for g in got}), False)


def _row(image, label, split, names) -> tuple[bytes, str | list[str], bool, str | None] | str:
    data = image_bytes(image)
    if isinstance(data, str):
        return data
    lab = _labels(label, names) if isinstance(label, list) else _label(label, names)
    if isinstance(lab, str):
        return lab
    fixed = None
    if split is not None and str(split).strip():
        fixed = _SPLIT_NAMES.get(str(split).strip().lower())
        if fixed is None:
            return f"split {split!r} is not one of train, validation, val, test"
    return data, lab[0], lab[1], fixed


def scan_file(url: str, storage_options: dict | None = None) -> dict:
    """One pass over a Parquet file: sample records ``[row, label, split, digest, is_index]``, problems
    ``[row, reason]`` and the ClassLabel names; a missing column or unreadable file raises."""
    import pyarrow.parquet as pq

    samples, problems = [], []
    try:
        with open_file(url, storage_options) as f:
            pf = pq.ParquetFile(f)
            columns = pf.schema_arrow.names
            label_col = "labels" if "labels" in columns and "label" not in columns else "label"
            missing = [c for c in ("image", label_col) if c not in columns]
            if missing:
                raise FeatcacheError(
                    f"{url}: Parquet file has no {' or '.join(repr(c) for c in missing)} column "
                    f"(columns: {', '.join(columns)}); expected the Hugging Face layout (image, label)"
                )
            names = class_names_from_metadata(pf.schema_arrow.metadata)
            wanted = ["image", label_col] + (["split"] if "split" in columns else [])
            row = 0
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                cols = batch.to_pydict()
                splits = cols.get("split") or [None] * batch.num_rows
                for image, label, split in zip(cols["image"], cols[label_col], splits, strict=True):
                    got = _row(image, [] if label_col == "labels" and label is None else label, split, names)
                    if isinstance(got, str):
                        problems.append([row, got])
                    else:
                        samples.append([row, got[1], got[3], digest_bytes(got[0]), got[2]])
                    row += 1
    except FeatcacheError:
        raise
    except OSError as e:
        problems.append([-1, storage_reason(e)])
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends: a damaged file
        problems.append([-1, f"not a readable Parquet file ({type(e).__name__}: {e})"])
    return {"samples": samples, "problems": problems, "class_names": names if samples or problems else None}


class _File:
    """One open Parquet file and its most recently read row group's images."""

    def __init__(self, url: str, storage_options: dict | None):
        import pyarrow.parquet as pq

        self.lock = threading.Lock()
        self.file = open_file(url, storage_options)
        self.pf = pq.ParquetFile(self.file)
        meta = self.pf.metadata
        self.starts = [0]
        for i in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(i).num_rows)
        self.group, self.images = -1, []

    def read(self, row: int) -> bytes:
        with self.lock:
            g = bisect.bisect_right(self.starts, row) - 1
            if not 0 <= g < len(self.starts) - 1:
                raise DecodeError(f"row {row} not in the file")
            if g != self.group:
                self.images = []  # drop the previous row group before loading the next
                self.images = self.pf.read_row_group(g, columns=["image"]).column("image").to_pylist()
                self.group = g
            data = image_bytes(self.images[row - self.starts[g]])
        if isinstance(data, str):
            raise DecodeError(data)
        return data

    def close(self) -> None:
        self.images = []
        self.file.close()


_FILES: OrderedDict[tuple[str, str], _File] = OrderedDict()
_LOCK = threading.Lock()


def read_row(url: str, row: int, storage_options: dict | None = None) -> bytes:
    """The image bytes of ``row`` of Parquet file ``url``."""
    key = (url, json.dumps(storage_options or {}, sort_keys=True, default=str))
    try:
        with _LOCK:
            f = _FILES.get(key)
            if f is None:
                f = _FILES[key] = _File(url, storage_options)
                while len(_FILES) > OPEN_FILES:
                    _FILES.popitem(last=False)[1].close()
            else:
                _FILES.move_to_end(key)
        return f.read(row)
    except DecodeError:
        raise
    except OSError as e:
        raise OSError(storage_reason(e)) from None
    except Exception as e:  # noqa: BLE001 - pyarrow errors on a damaged file become a reason
        raise DecodeError(f"cannot read Parquet row ({type(e).__name__}: {e})") from None


def close_readers() -> None:
    with _LOCK:
        while _FILES:
            _FILES.popitem()[1].close()


def _forget_after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    _FILES.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
