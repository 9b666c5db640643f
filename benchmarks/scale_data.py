"""The ``scale`` benchmark's images: N unique small PNGs in class folders, made from Fashion-MNIST.

Image ``i`` is Fashion-MNIST image ``i mod 70,000`` (train then test) padded to 32×32 at one of 25 offsets
(``i // 70,000``), with ``i`` written into three pixels of the padding, so every file's content, and so its
digest, is unique at any N. Folders: ``<root>/<class>/<i:07d>.png``. Smaller sets are hard links to the first
N files of a larger one (``link_subset``), so 100k, 300k and 1M share one generation.

    python -m benchmarks.scale_data /path/to/root 1000000
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SIZE = 32
FMNIST = Path("/usr/share/datasets/fashion-mnist")
FILES = [
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
]


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _source() -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([_read_idx(FMNIST / a) for a, _ in FILES])
    labels = np.concatenate([_read_idx(FMNIST / b) for _, b in FILES])
    return images, labels


def class_folder(name: str) -> str:
    return name.replace("/", "_")


def unique_image(images: np.ndarray, i: int) -> np.ndarray:
    """Image ``i``: a Fashion-MNIST picture at one of 25 offsets, ``i`` stamped into its padding."""
    base = images[i % len(images)]
    shift = (i // len(images)) % 25
    dy, dx = divmod(shift, 5)
    out = np.zeros((SIZE, SIZE), np.uint8)
    out[dy : dy + 28, dx : dx + 28] = base
    out[SIZE - 1, SIZE - 3 :] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
    return out


def _write_range(root: str, start: int, stop: int) -> int:
    from PIL import Image

    from pipeline.data.sources import FASHION_MNIST_CLASSES

    images, labels = _source()
    for i in range(start, stop):
        cls = class_folder(FASHION_MNIST_CLASSES[int(labels[i % len(labels)])])
        path = Path(root) / cls / f"{i:07d}.png"
        if not path.exists():
            Image.fromarray(unique_image(images, i)).save(path, compress_level=1)
    return stop - start


def make_scale_folder(root: Path, n: int, workers: int = 2) -> Path:
    """``n`` unique images under ``root`` (files already there are kept: generation resumes)."""
    from pipeline.data.sources import FASHION_MNIST_CLASSES

    for cls in FASHION_MNIST_CLASSES:
        (root / class_folder(cls)).mkdir(parents=True, exist_ok=True)
    step = 20_000
    with ProcessPoolExecutor(workers) as pool:
        list(
            pool.map(
                _write_range,
                [str(root)] * len(range(0, n, step)),
                range(0, n, step),
                [min(n, s + step) for s in range(0, n, step)],
            )
        )
    return root


def link_subset(big: Path, small: Path, n: int, start: int = 0) -> Path:
    """Images ``start`` to ``n - 1`` of ``big`` (the first ``n`` by default) as hard links under ``small``
    (no copy)."""
    for cls_dir in sorted(p for p in big.iterdir() if p.is_dir()):
        (small / cls_dir.name).mkdir(parents=True, exist_ok=True)
        for f in os.scandir(cls_dir):
            if start <= int(f.name[:7]) < n and not (small / cls_dir.name / f.name).exists():
                os.link(f.path, small / cls_dir.name / f.name)
    return small


def read_subset(small: Path, start: int) -> int:
    """Read every image numbered ``start`` or more under ``small`` once (their bytes; how many): the growth
    and the empty-cache step then both find the new images in the page cache. Without it the first of the
    two pays their cold reads (10,000 new images at 1M rows: ~1 s of digests and a slower decode) and the
    second, reading the same inodes, does not."""
    done = 0
    for cls_dir in (p for p in small.iterdir() if p.is_dir()):
        for f in os.scandir(cls_dir):
            if int(f.name[:7]) >= start:
                with open(f.path, "rb") as fh:
                    fh.read()
                done += 1
    return done


def trim_subset(small: Path, n: int) -> int:
    """Remove the links of images numbered ``n`` or more from ``small`` (undo a growth); how many."""
    removed = 0
    for cls_dir in (p for p in small.iterdir() if p.is_dir()):
        for f in os.scandir(cls_dir):
            if int(f.name[:7]) >= n:
                os.unlink(f.path)
                removed += 1
    return removed


if __name__ == "__main__":
    make_scale_folder(Path(sys.argv[1]), int(sys.argv[2]))
