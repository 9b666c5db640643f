"""Sharded sources (WebDataset tars, Parquet files): expand the pattern, list each shard once, remember it.

Each shard is listed by its format module in one streaming pass that yields sample records with content
digests. The records are kept in a :class:`~pipeline.data.storage.ShardIndex` under the shard's signature
(size + ETag/mtime), so a rerun lists an unchanged shard without reading it. Samples refer to their shard
by URL and to their image by member name (tar) or row (Parquet): plain, picklable data.
"""

from __future__ import annotations

import posixpath
import re

from pipeline.data import parquet, webdataset
from pipeline.data.samples import Dataset, Sample, label_sets
from pipeline.data.splits import group_of
from pipeline.data.storage import ShardIndex, expand, join_url, signature
from pipeline.utils.config import DataConfig
from pipeline.utils.errors import FeatcacheError

#: bump when the records a scan produces change meaning
INDEX_VERSION = 1


def shard_kind(src: str) -> str | None:
    """``"tar"`` or ``"parquet"`` from the pattern's suffix; None for anything else."""
    tail = src.rstrip("/").lower()
    if tail.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if tail.endswith(".parquet"):
        return "parquet"
    return None


def _names(paths: list[str]) -> list[str]:
    """Shard names relative to the folder they share (the sample keys' first part)."""
    if len(paths) == 1:
        return [posixpath.basename(paths[0].rstrip("/"))]
    common = posixpath.commonpath([p.replace("\\", "/") for p in paths])
    return [posixpath.relpath(p.replace("\\", "/"), common) for p in paths]


def _listing(kind: str, url: str, fs, path: str, options: dict, index: ShardIndex) -> dict:
    sig = signature(fs, path)
    tag = f"{kind}:{INDEX_VERSION}"
    entry = index.get(url, sig)
    if entry is not None and entry.get("kind") == tag:
        return entry
    if kind == "tar":
        entry = webdataset.scan_shard(url, options)
    else:
        entry = parquet.scan_file(url, options)
    if not any(
        p[-1].startswith(("missing credentials", "access denied", "unreachable")) for p in entry["problems"]
    ):
        index.put(url, sig, {"kind": tag, **entry})
    return entry


def _records(kind, name, url, entry, pattern) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    samples, problems = [], []
    for rec in entry["samples"]:
        if kind == "tar":
            key, label, member, digest, _ = rec
            k = f"{name}/{key}"
            split, row = None, -1
        else:
            row, label, split, digest, _ = rec
            k, member = f"{name}/{row}", ""
        many = tuple(label) if isinstance(label, list) else None  # a multi-label sample's classes
        text = ";".join(many) if many is not None else label
        samples.append(Sample(k, text, split, group_of(k, pattern), url, row, member, digest, labels=many))
    for rec in entry["problems"]:
        where, reason = rec[0], rec[-1]
        k = f"{name}/{where}" if where not in ("", -1) else name
        problems.append((Sample(k, "", path=url, member=rec[1] if kind == "tar" else ""), reason))
    return samples, problems


def _class_names(entries: list[dict], samples: list[Sample]) -> list[str]:
    """ClassLabel names when the files carry them, class indices as ``0..max``, else the sorted labels."""
    declared = next((e["class_names"] for e in entries if e.get("class_names")), None)
    if declared is not None:
        return list(declared)
    numeric = [r[-1] for e in entries for r in e["samples"]]
    if numeric and all(numeric):
        return [str(i) for i in range(max(int(s.label) for s in samples) + 1)]
    return sorted({s.label for s in samples})


def load_shards(cfg: DataConfig, kind: str, index_dir=None, src: str | None = None) -> Dataset:
    """Every shard the pattern names, listed (or recalled from the index) into one dataset."""
    src = src or cfg.source.strip()
    options = dict(cfg.storage_options)
    fs, paths = expand(src, options)
    if kind == "parquet" and len(paths) == 1 and fs.isdir(paths[0]):
        fs, paths = expand(posixpath.join(join_url(fs, paths[0]), "**", "*.parquet"), options)
    pattern = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    index = ShardIndex(index_dir, options)
    samples: list[Sample] = []
    problems: list[tuple[Sample, str]] = []
    entries = []
    for name, path in zip(_names(paths), paths, strict=True):
        url = join_url(fs, path)
        entry = _listing(kind, url, fs, path, options, index)
        entries.append(entry)
        got, bad = _records(kind, name, url, entry, pattern)
        samples += got
        problems += bad
    if not samples:
        first = f": {problems[0][0].key}: {problems[0][1]}" if problems else ""
        raise FeatcacheError(f"{src}: no usable samples in {len(paths)} {kind} file(s){first}")
    multi = [s.labels is not None for s in samples]
    if any(multi) and not all(multi):
        raise FeatcacheError(f"{src}: some samples have one label and others a list of labels; use one kind")
    if all(multi):
        declared = next((e["class_names"] for e in entries if e.get("class_names")), None)
        class_names = list(declared) if declared is not None else label_sets([s.labels for s in samples])
        used = set(class_names)
    else:
        class_names = _class_names(entries, samples)
        used = {s.label for s in samples}
    if len(used) < 2:
        raise FeatcacheError(f"{src}: need at least 2 classes to train a classifier, found {sorted(used)}")
    name = cfg.name or _dataset_name(src)
    return Dataset(
        name, src, samples, class_names, problems=problems, storage_options=options, multilabel=all(multi)
    )


def _dataset_name(src: str) -> str:
    """``s3://b/shards/train-{0000..0009}.tar`` → ``train``; a folder's own name otherwise."""
    path = src.split("://", 1)[-1].rstrip("/")
    base = posixpath.basename(path)
    stem = re.split(r"[-_]?[{*?\[]|\.", base, maxsplit=1)[0]
    stem = re.sub(r"[-_]\d+$", "", stem)
    return stem or posixpath.basename(posixpath.dirname(path)) or "shards"
