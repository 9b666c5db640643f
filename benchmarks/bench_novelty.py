"""Novelty at predict time (issue 37): the share of images flagged ``novel`` by a Fashion-MNIST run, for
images of its own domain it never saw and for images of another domain.

The run: logistic regression on the ``index`` section's Fashion-MNIST cache (EfficientNet-Lite0, 64 px,
10,000 training images), its threshold the 95th percentile of its val rows' novelty. In-distribution:
``N_QUERIES`` images of the Fashion-MNIST *test* file, written as PNG (never in the cache: their features
are computed). Another domain: as many random crops (80–300 px) of scikit-learn's two natural photos
(``china.jpg``, ``flower.jpg``), written as JPEG. Both through ``pipeline.predict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

N_QUERIES = 300


def _photo_crops(root: Path, n: int) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(3)
    photos = [np.asarray(img) for img in load_sample_images().images]
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        photo = photos[i % 2]
        h, w = (int(x) for x in rng.integers(80, 300, 2))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        p = root / f"photo_{i:04d}.jpg"
        Image.fromarray(np.ascontiguousarray(photo[y : y + h, x : x + w])).save(p, quality=90)
        out.append(p)
    return out


def _fashion_test(root: Path, n: int) -> list[Path]:
    from PIL import Image

    from benchmarks.bench_audit import FMNIST, _read_idx

    images = _read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in np.random.default_rng(4).choice(len(images), n, replace=False):
        p = root / f"fm_test_{i:05d}.png"
        Image.fromarray(images[i]).save(p)
        out.append(p)
    return out


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    import pipeline
    from benchmarks.bench_index import real_cache

    n = 60 if quick else N_QUERIES
    cache = real_cache(out_dir, quick)
    run = pipeline.train(cache=str(cache), head="logistic", runs_dir=str(out_dir / "novelty-runs"))
    recorded = run.metrics["novelty"]
    shares = {}
    for name, files in (
        ("fashion_mnist_test", _fashion_test(out_dir / "novelty-fm", n)),
        ("natural_photos", _photo_crops(out_dir / "novelty-photos", n)),
    ):
        _, results = pipeline.predict(run.run_dir, [str(f) for f in files], progress=False)
        flags = [r.novel for r in results if r.error is None]
        scores = [r.novelty for r in results if r.error is None]
        shares[name] = {
            "images": len(flags),
            "flagged": round(float(np.mean(flags)), 4),
            "median_novelty": round(float(np.median(scores)), 4),
        }
    return {"rows": run.metrics["cache"]["rows"], "threshold": recorded, "shares": shares}


def markdown(results: dict[str, Any]) -> str:
    t = results["threshold"]
    lines = [
        f"Run: logistic on {sum(results['rows'].values()):,} cached Fashion-MNIST rows; threshold "
        f"{t['threshold']:.4f} = the {t['percentile']:g}th percentile of val's novelty ({t['val_flagged']:.1%} of val above it).",
        "",
        "| images | n | flagged novel | median novelty |",
        "|---|---|---|---|",
    ]
    for name, s in results["shares"].items():
        lines.append(
            f"| {name.replace('_', ' ')} | {s['images']} | {s['flagged']:.1%} | {s['median_novelty']} |"
        )
    return "\n".join(lines)
