"""Multi-label test data from real images: 2×2 mosaics of Fashion-MNIST test images, each labelled with
the set of classes it shows (a blank cell shows none, so some mosaics have no label). Used by the multi-label
tests and by ``benchmarks.bench_multilabel``."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {1: "trouser", 5: "sandal", 8: "bag", 9: "boot"}  # Fashion-MNIST label → name (the tests' four)
#: all ten Fashion-MNIST classes (the benchmark's mosaics)
ALL_CLASSES = dict(
    enumerate(["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"])
)

HAVE_FASHION = (FASHION / "t10k-images-idx3-ubyte.gz").is_file()


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3]))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape)


def write_mosaics(
    root: Path,
    n: int,
    seed: int = 0,
    sep: str = ";",
    blank: float = 0.4,
    classes: dict[int, str] | None = None,
) -> list[set[str]]:
    """``n`` 56×56 PNG mosaics and ``labels.csv`` (``path,labels``); returns each mosaic's label set. Each
    cell is blank with probability ``blank``, else a random image of one of ``classes`` (default the four)."""
    classes = CLASSES if classes is None else classes
    rng = np.random.default_rng(seed)
    images, labels = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    pool = {c: np.flatnonzero(labels == c) for c in classes}
    root.mkdir(parents=True, exist_ok=True)
    truth, lines = [], ["path,labels"]
    for i in range(n):
        mosaic, names = np.zeros((56, 56), np.uint8), set()
        for cell in range(4):
            if rng.random() < blank:
                continue  # a blank cell
            c = int(rng.choice(list(classes)))
            y, x = 28 * (cell // 2), 28 * (cell % 2)
            mosaic[y : y + 28, x : x + 28] = images[int(rng.choice(pool[c]))]
            names.add(classes[c])
        Image.fromarray(mosaic).save(root / f"m{i:04d}.png")
        lines.append(f"m{i:04d}.png,{sep.join(sorted(names))}")
        truth.append(names)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return truth


def mosaic_config(tmp: Path, source: Path | None = None, **extra):
    """The tests' config on mosaics under ``tmp/data`` (or ``source``): 32 px, the cache in ``tmp/cache``,
    no progress bars; ``extra`` are dotted keys on top."""
    from pipeline.utils.config import load_config

    keys = {
        "data.source": str(source if source is not None else tmp / "data" / "labels.csv"),
        "extract.cache_dir": str(tmp / "cache"),
        "backbone.image_size": 32,
        "extract.batch_size": 32,
        "extract.progress": False,
    }
    return load_config(None, {**keys, **extra})
