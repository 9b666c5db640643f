"""Folders and CSVs behind an fsspec URL (``s3://bucket/photos/``, ``gs://…/labels.csv``, ``https://…``).

The same layouts as on disk: one sub-folder per class, optionally under ``train/ val/ test/``, or a CSV
of ``path,label[,split][,group]`` whose relative paths resolve against the CSV's own URL. Every image is
read through fsspec; a listed file carries a stamp (size + ETag/mtime) so a rerun reuses the digests of
unchanged objects without downloading them again.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re

from pipeline.data.decode import IMAGE_EXTENSIONS
from pipeline.data.labels_csv import read_rows
from pipeline.data.samples import Dataset, Sample, label_sets
from pipeline.data.splits import group_of
from pipeline.data.storage import filesystem, is_url, join_url, signature, storage_error
from pipeline.utils.config import SPLITS, DataConfig
from pipeline.utils.errors import FeatcacheError


def _stamp(fs, path: str, info: dict) -> tuple[int, int] | None:
    sig = signature(fs, path, info)
    if sig is None:
        return None
    size = int(sig.split(":", 1)[0])
    return size, int.from_bytes(hashlib.blake2b(sig.encode(), digest_size=8).digest(), "big") >> 1


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
        samples.append(Sample(rel, label, split, group_of(rel, pattern), url, stamp=_stamp(fs, path, info)))
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
    rows = read_rows(io.StringIO(text, newline=""), src, pattern)
    samples = [
        Sample(
            r.path,
            r.label,
            r.split,
            r.group,
            r.path if is_url(r.path) else posixpath.join(base, r.path),
            labels=r.labels,
        )
        for r in rows
    ]
    multi = label_sets([r.labels for r in rows])
    class_names = multi if multi is not None else sorted({s.label for s in samples})
    if len(class_names) < 2:
        raise FeatcacheError(f"{src}: need at least 2 classes to train a classifier, found {class_names}")
    name = cfg.name or posixpath.splitext(posixpath.basename(path))[0]
    return Dataset(
        name,
        src,
        samples,
        class_names,
        storage_options=dict(cfg.storage_options),
        multilabel=multi is not None,
    )


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
