"""Folders and CSVs behind an fsspec URL (``s3://bucket/photos/``, ``gs://…/labels.csv``, ``https://…``).

The same layouts as on disk: one sub-folder per class, optionally under ``train/ val/ test/``, or a CSV
of ``path,label[,split][,group]`` whose relative paths resolve against the CSV's own URL. Every image is
read through fsspec; a listed file carries a stamp (size + ETag/mtime) so a rerun reuses the digests of
unchanged objects without downloading them again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re

from pipeline.data.decode import IMAGE_EXTENSIONS
from pipeline.data.samples import Dataset, Sample
from pipeline.data.storage import filesystem, is_url, join_url, signature, storage_error
from pipeline.utils.config import SPLITS, DataConfig
from pipeline.utils.errors import FeatcacheError


def _stamp(fs, path: str, info: dict) -> tuple[int, int] | None:
    sig = signature(fs, path, info)
    if sig is None:
        return None
    size = int(sig.split(":", 1)[0])
    return size, int.from_bytes(hashlib.blake2b(sig.encode(), digest_size=8).digest(), "big") >> 1


def _group(key: str, pattern) -> str | None:
    if pattern is None:
        return None
    m = pattern.search(key)
    return None if not m else (m.group(1) if m.groups() else m.group(0))


def remote_folder(src: str, cfg: DataConfig, fs, root: str) -> Dataset:
    pattern = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    try:
        found = fs.find(root, detail=True)
    except Exception as e:  # noqa: BLE001 - credentials, network: the whole source is unusable
        raise storage_error(src, e) from None
    rels = {posixpath.relpath(p, root.rstrip("/")): (p, info) for p, info in sorted(found.items())}
    split_layout = any(r.split("/", 1)[0] in SPLITS and r.count("/") >= 2 for r in rels)
    samples, ignored = [], []
    for rel, (path, info) in rels.items():
        parts = rel.split("/")
        depth = 2 if split_layout else 1
        name = parts[-1]
        if (
            len(parts) <= depth
            or (split_layout and parts[0] not in SPLITS)
            or name.startswith(".")
            or posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS
        ):
            ignored.append(rel)
            continue
        split = parts[0] if split_layout else None
        label = parts[1] if split_layout else parts[0]
        url = join_url(fs, path)
        samples.append(Sample(rel, label, split, _group(rel, pattern), url, stamp=_stamp(fs, path, info)))
    if not samples:
        raise FeatcacheError(f"{src}: no images found (expected one sub-folder per class)")
    class_names = sorted({s.label for s in samples})
    if len(class_names) < 2:
        raise FeatcacheError(f"{src}: need at least 2 classes to train a classifier, found {class_names}")
    name = cfg.name or posixpath.basename(root.rstrip("/")) or "data"
    return Dataset(
        name, src, samples, class_names, ignored=ignored, storage_options=dict(cfg.storage_options)
    )


def remote_csv(src: str, cfg: DataConfig, fs, path: str) -> Dataset:
    pattern = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    try:
        text = fs.cat_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise FeatcacheError(f"{src}: CSV is not UTF-8 text") from None
    except Exception as e:  # noqa: BLE001
        raise storage_error(src, e) from None
    base = posixpath.dirname(join_url(fs, path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = set(reader.fieldnames or [])
    if not {"path", "label"} <= fields:
        raise FeatcacheError(
            f"{src}: CSV needs a header with 'path' and 'label' columns, got {sorted(fields)}"
        )
    samples = []
    for lineno, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise FeatcacheError(f"{src}:{lineno}: empty path or label")
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise FeatcacheError(f"{src}:{lineno}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        group = (row.get("group") or "").strip() or _group(rel, pattern)
        full = rel if is_url(rel) else posixpath.join(base, rel)
        samples.append(Sample(rel, label, split, group, full))
    if not samples:
        raise FeatcacheError(f"{src}: CSV has no rows")
    class_names = sorted({s.label for s in samples})
    if len(class_names) < 2:
        raise FeatcacheError(f"{src}: need at least 2 classes to train a classifier, found {class_names}")
    name = cfg.name or posixpath.splitext(posixpath.basename(path))[0]
    return Dataset(name, src, samples, class_names, storage_options=dict(cfg.storage_options))


def load_remote(src: str, cfg: DataConfig) -> Dataset:
    """A folder or CSV at a URL (shards are :mod:`pipeline.data.shards`' business)."""
    fs, path = filesystem(src, cfg.storage_options)
    try:
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    except Exception as e:  # noqa: BLE001
        raise storage_error(src, e) from None
    if not exists:
        raise FeatcacheError(f"data source not found: {src}")
    if is_dir:
        return remote_folder(src, cfg, fs, path)
    if path.lower().endswith(".csv"):
        return remote_csv(src, cfg, fs, path)
    raise FeatcacheError(f"data source {src}: expected a folder, a .csv, .tar shards or .parquet at that URL")
