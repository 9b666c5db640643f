"""Data sources: turn a folder, a CSV, an ``.npz``, WebDataset tar shards, Parquet (Hugging Face layout) or
the built-in demo, on disk or behind any fsspec URL, into a list of samples.

A source only *lists* samples and reads their raw content; decoding, resizing and the backbone come later.
Every sample has a stable ``key`` (its path relative to the dataset root, or its row for arrays), a class
label, and a content digest computed lazily, so the cache can tell "same image" from "changed image" no
matter where the folder lives.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from pipeline.data.labels_csv import read_rows
from pipeline.data.listing import FileListing, Folder, scan_class_folders, storable_key
from pipeline.data.samples import Dataset, Sample, label_sets
from pipeline.data.storage import digest_bytes, expand_braces, filesystem, has_magic, is_url
from pipeline.utils.config import SPLITS, DataConfig
from pipeline.utils.errors import FeatcacheError

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_dirs() -> list[Path]:
    """Where Fashion-MNIST is looked for: Keras' own download cache first, then Debian's package."""
    dirs = []
    if os.environ.get("FEATCACHE_FASHION_MNIST"):
        dirs.append(Path(os.environ["FEATCACHE_FASHION_MNIST"]))
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    dirs += [keras_home / "datasets" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    return dirs


def _check_classes(name: str, class_names: list[str]) -> None:
    if len(class_names) < 2:
        found = f"only {class_names[0]!r}" if class_names else "none"
        raise FeatcacheError(f"{name}: need at least 2 classes to train a classifier, found {found}")


def _folder(root: Path, cfg: DataConfig, listed: dict[bytes, list[bytes]]) -> Dataset:
    """A folder of class folders (or of split folders of class folders), listed as arrays: its samples
    are built when a stage asks for them (:mod:`pipeline.data.listing`). ``listed``: folders whose names
    were read already."""
    pattern = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    folders: list[Folder] = []
    ignored: list[str] = []
    empty: list[str] = []
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    classes: set[str] = set()
    if split_dirs:
        for d in split_dirs:
            classes |= scan_class_folders(d, d.name, listed, folders, ignored, empty)
    else:
        classes = scan_class_folders(root, None, listed, folders, ignored, empty)
    listing = FileListing(folders, pattern)
    if empty:
        raise FeatcacheError(
            f"class folder has no images: {empty[0]}"
            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
        )
    if not len(listing):
        raise FeatcacheError(
            f"{root}: no images found (expected one sub-folder per class, e.g. {root}/cats/*.jpg)"
        )
    class_names = sorted(classes)
    _check_classes(str(root), class_names)
    return Dataset(cfg.name or root.name, str(root), None, class_names, ignored=ignored, listing=listing)


def _csv(path: Path, cfg: DataConfig) -> Dataset:
    pattern = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    with open(path, newline="", encoding="utf-8") as f:
        rows = read_rows(f, str(path), pattern)
    samples = [
        Sample(
            storable_key(r.path), r.label, r.split, r.group, _resolve(r.path, path.parent), labels=r.labels
        )
        for r in rows
    ]
    multi = label_sets([r.labels for r in rows])
    class_names = multi if multi is not None else sorted({s.label for s in samples})
    _check_classes(str(path), class_names)
    return Dataset(cfg.name or path.stem, str(path), samples, class_names, multilabel=multi is not None)


def _resolve(rel: str, base: Path) -> str:
    return rel if os.path.isabs(rel) or is_url(rel) else str(base / rel)


def _npz(path: Path, cfg: DataConfig) -> Dataset:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable archive is a user error
        raise FeatcacheError(f"{path}: cannot read .npz ({e})") from None
    with z:
        img_key = next((k for k in ("images", "x", "X") if k in z.files), None)
        lab_key = next((k for k in ("labels", "y", "Y") if k in z.files), None)
        if img_key is None or lab_key is None:
            raise FeatcacheError(f"{path}: .npz needs 'images' and 'labels' arrays, has {z.files}")
        images, labels = z[img_key], z[lab_key]
        names = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise FeatcacheError(
            f"{path}: images must be N×H×W or N×H×W×C (C in 1, 3, 4), got shape {images.shape}"
        )
    if len(labels) != len(images):
        raise FeatcacheError(f"{path}: {len(images)} images but {len(labels)} labels")
    if images.dtype != np.uint8:
        if images.dtype.kind == "f" and images.size and float(images.max()) <= 1.0:
            images = images * 255.0
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    if labels.dtype.kind in "iu":
        class_names = names or [str(i) for i in range(int(labels.max()) + 1)]
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise FeatcacheError(f"{path}: labels must lie in [0, {len(class_names)})")
        label_str = [class_names[int(i)] for i in labels]
    else:
        label_str = [str(v) for v in labels]
        class_names = names or sorted(set(label_str))
    used = sorted(set(label_str), key=class_names.index)
    _check_classes(str(path), used)
    width = len(str(len(images)))
    samples = [Sample(f"{i:0{width}d}", lab, None, None, None, i) for i, lab in enumerate(label_str)]
    return Dataset(cfg.name or path.stem, str(path), samples, class_names, arrays=images)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(cfg: DataConfig) -> Dataset:
    for d in fashion_mnist_dirs():
        if all((d / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair):
            break
    else:
        raise FeatcacheError(
            "Fashion-MNIST not found in "
            + ", ".join(str(d) for d in fashion_mnist_dirs())
            + ": install the Debian package dataset-fashion-mnist (`make install` does) or run"
            " keras.datasets.fashion_mnist.load_data() once while online"
        )
    parts, samples = [], []
    offset = 0
    for split, (img_file, lab_file) in FASHION_MNIST_FILES.items():
        images, labels = _read_idx(d / img_file), _read_idx(d / lab_file)
        parts.append(images)
        # The official test set stays the test set; the official training set is split into train/val.
        fixed = "test" if split == "test" else "trainval"
        samples += [
            Sample(f"{split}/{i:05d}", FASHION_MNIST_CLASSES[int(lab)], fixed, None, None, offset + i)
            for i, lab in enumerate(labels)
        ]
        offset += len(images)
    return Dataset(
        cfg.name or "fashion_mnist",
        str(d),
        samples,
        list(FASHION_MNIST_CLASSES),
        arrays=np.concatenate(parts),
    )


__all__ = [
    "Dataset",
    "Sample",
    "content_digests",
    "digest_bytes",
    "load_dataset",
    "sample_digest",
    "storable_key",
]


def _parquet_folder(fs, path: str) -> bool:
    """A folder holding ``.parquet`` files (the Hugging Face Hub layout: ``data/*.parquet``, ``<config>/*``)."""
    try:
        return any(fs.glob(path.rstrip("/") + "/" + "*/" * depth + "*.parquet") for depth in range(3))
    except Exception:  # noqa: BLE001 - the listing proper reports the reason
        return False


_PARQUET_NAME = re.compile(rb"(?:^|\0)[^.\0][^\0]*\.parquet(?=\0|$)")  # in names joined by NUL


def _has_parquet(root: bytes, listed: dict[bytes, list[bytes]], depth: int = 2) -> bool:
    """A ``*.parquet`` file at most ``depth`` folders below ``root`` (names starting with a dot skipped, as
    a glob would). A million-image folder costs one ``listdir`` and one regex pass per folder, in C; a
    folder whose link count says it has no sub-folders (2 on ext4/XFS) is not looked into further. The
    names read are kept in ``listed`` (folder → names), for the listing of a folder source."""
    try:
        names = listed[root] = os.listdir(root)
        leaf = os.stat(root).st_nlink == 2
    except OSError:
        return False
    joined = b"\0".join(names)
    if b".parquet" in joined and _PARQUET_NAME.search(joined):  # the search only where it can match
        return True
    if depth == 0 or leaf:
        return False
    subs = (os.path.join(root, n) for n in names if not n.startswith(b"."))
    return any(_has_parquet(p, listed, depth - 1) for p in subs if os.path.isdir(p))


def _load(src: str, cfg: DataConfig, index_dir) -> Dataset:
    from pipeline.data.shards import load_shards, shard_kind

    if src.startswith("file://"):
        src = src[len("file://") :]
    kind = shard_kind(src)
    if kind is not None:
        return load_shards(cfg, kind, index_dir, src)
    if is_url(src):
        fs, path = filesystem(src, cfg.storage_options)
        if not path.lower().endswith(".csv") and _parquet_folder(fs, path):
            return load_shards(cfg, "parquet", index_dir, src)
        from pipeline.data.remote import load_remote

        return load_remote(src, cfg)
    p = Path(src).expanduser()
    if not p.exists():
        if has_magic(src) or len(expand_braces(src)) > 1:
            raise FeatcacheError(
                f"data source {src}: brace ranges and globs must name .tar or .parquet shards"
            )
        raise FeatcacheError(f"data source not found: {src}")
    if p.is_dir():
        listed: dict[bytes, list[bytes]] = {}
        if _has_parquet(os.fsencode(str(p)), listed):
            return load_shards(cfg, "parquet", index_dir, str(p))
        return _folder(p, cfg, listed)
    if p.suffix.lower() == ".csv":
        return _csv(p, cfg)
    if p.suffix.lower() == ".npz":
        return _npz(p, cfg)
    raise FeatcacheError(
        f"data source {src}: expected a folder, a .csv, a .npz, .tar shards, .parquet or 'fashion_mnist'"
    )


def load_dataset(cfg: DataConfig, index_dir: str | Path | None = None) -> Dataset:
    """Resolve ``cfg.source`` to a :class:`Dataset`, with one clear error for anything unusable.

    ``index_dir`` is where shard listings are remembered (``<cache_dir>/shards``): with it, an unchanged
    tar or Parquet shard is not read again to list its samples.
    """
    src = cfg.source.strip()
    if src in ("fashion_mnist", "fashion-mnist"):
        ds = _fashion_mnist(cfg)
    else:
        ds = _load(src, cfg, index_dir)
    if cfg.limit and cfg.limit < len(ds.samples):
        # A stable subset: the samples whose key hashes lowest, so raising the limit only adds samples.
        ranked = sorted(ds.samples, key=lambda s: hashlib.blake2b(s.key.encode(), digest_size=8).digest())
        keep = {s.key for s in ranked[: cfg.limit]}
        ds.samples = [s for s in ds.samples if s.key in keep]
    return ds


def _stat(s: Sample) -> tuple[int, int]:
    if s.stamp is not None:
        return s.stamp
    if s.path is None or s.member or s.index >= 0 or is_url(s.path):
        return -1, -1
    st = os.stat(s.path)
    return st.st_size, st.st_mtime_ns


def sample_digest(ds: Dataset, s: Sample) -> str:
    """One sample's content digest, as :func:`content_digests` computes it (reading it unless known)."""
    if ds.arrays is not None:
        a = ds.arrays[s.index]
        return digest_bytes(a.tobytes() + repr(a.shape).encode())
    return s.digest or digest_bytes(ds.read(s))


def content_digests(ds: Dataset, known: dict[str, tuple[int, int, str]]):
    """Sample key → (content digest, size, mtime) of every sample, and the unusable ones as (sample, "",
    reason). Files whose size and mtime match ``known`` (key → (size, mtime, digest), a cache's) are not
    re-read; shard members come with the digest their listing computed; the listing's problems are
    unusable."""
    from pipeline.data.decode import DecodeError, os_error_reason

    out: dict[str, tuple[str, int, int]] = {}
    bad: list[tuple[Sample, str, str]] = [(s, "", reason) for s, reason in ds.problems]
    for s in ds.samples:
        if ds.arrays is not None or s.digest:
            out[s.key] = (sample_digest(ds, s), -1, -1)
            continue
        try:
            size, mtime = _stat(s)
            hit = known.get(s.key)
            if hit and size >= 0 and hit[0] == size and hit[1] == mtime:
                out[s.key] = (hit[2], size, mtime)
                continue
            out[s.key] = (digest_bytes(ds.read(s)), size, mtime)
        except DecodeError as e:
            bad.append((s, "", str(e)))
        except OSError as e:
            bad.append((s, "", os_error_reason(e) if e.errno else str(e)))
    return out, bad
