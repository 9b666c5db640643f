"""Decode benchmark: ``data.decode=dct`` against ``exact`` — speed on phone photos, and what it does to features.

    python -m benchmarks --only decode          # full; appends the section to RESULTS.md
    python -m benchmarks.bench_decode --quick   # small sizes, a smoke test

Four measurements, every ratio taken within this one run:

* **Extraction rate** (``featcache extract``, engine auto, 224 px): 12 MP JPEGs (4032×3024) with each policy, and
  ~500×375 JPEGs, next to the bare TFLite forward pass on decoded tensors; repetitions interleaved, ratios are
  medians of per-repetition ratios.
* **CPU per photo** (process time, one thread): decode, shared resize and backbone, for each policy and size,
  and for large non-JPEG files (PNG, WebP), which always decode at full size.
* **Features and a linear probe** on a real photo set: the 13 photos of ``efficientnet_lite0_reference.npz``
  (scikit-learn's and scikit-image's sample photos and darknet's test photos; 224×224 as stored) as 13
  classes. Each sample is a random crop (55–100 %), flip and colour jitter, **upscaled to 4032×3024** (bicubic)
  and saved as a camera-quality JPEG (q=92): the photos are real, the phone size is made by upscaling, so
  fine detail is softer than a real 12 MP sensor's. Features at 224 px for ``exact``, DCT ≥ 1× and ≥ 2× the
  input; relative feature difference to ``exact``, cosine, and logistic-regression accuracy (5-fold CV).
* The same at **natural resolution** (no upscaling: scikit-learn's two 427×640 photos, 260–427 px crops, 16
  classes of regions) at 64 px, where the DCT scale is 1/2 or 1/4 of real camera detail.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_engines import OUT, Quiet, _complete, _extract, _forward, make_large_photos, make_photos

REFERENCE = Path("/work/shared/data/reference/efficientnet_lite0_reference.npz")


def _median(xs) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------------------------- photo sets


def _reference_photos() -> tuple[list[np.ndarray], list[str]]:
    """The 13 real reference photos (224×224 RGB); scikit-learn's two 427×640 photos when the file is absent."""
    if REFERENCE.is_file():
        with np.load(REFERENCE) as z:
            return list(z["images"]), [str(n) for n in z["names"]]
    from sklearn.datasets import load_sample_images

    s = load_sample_images()
    return list(s.images), [Path(f).name for f in s.filenames]


def make_probe_set(root: Path, per_class: int, size: tuple[int, int], seed: int = 3) -> Path:
    """Real photos → random crop, flip, colour jitter → bicubic to ``size`` (w, h) → JPEG q=92, one folder each."""
    from PIL import Image, ImageEnhance

    n = per_class * 13
    if _complete(root, n):
        return root
    photos, _ = _reference_photos()
    rng = np.random.default_rng(seed)
    for c, photo in enumerate(photos):
        img = Image.fromarray(photo)
        w, h = img.size
        for i in range(per_class):
            frac = rng.uniform(0.55, 1.0)
            cw, ch = int(w * frac), int(min(h, w * frac * 3 / 4) if size[0] > size[1] else h * frac)
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = img.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
            im = ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2))
            d = root / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i:03d}.jpg", quality=92)
    (root / ".complete").write_text(str(n))
    return root


def make_natural_set(root: Path, per_class: int, seed: int = 4) -> Path:
    """Natural-resolution JPEG crops (q=92, no resampling) of scikit-learn's two photos: 8 regions each = 16 classes.

    A class is a 2×4 grid cell of one photo; a sample is a 260–400 px crop centred near that cell, so
    neighbouring classes overlap and the probe is not trivial.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    n = per_class * 16
    if _complete(root, n):
        return root
    rng = np.random.default_rng(seed)
    for p, photo in enumerate(load_sample_images().images):
        h, w = photo.shape[:2]
        for cell in range(8):
            cy, cx = (cell // 4 + 0.5) * h / 2, (cell % 4 + 0.5) * w / 4
            d = root / f"p{p}c{cell}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = int(rng.integers(260, min(h, 400) + 1))
                y = int(np.clip(cy - side / 2 + rng.normal(0, 20), 0, h - side))
                x = int(np.clip(cx - side / 2 + rng.normal(0, 20), 0, w - side))
                Image.fromarray(np.ascontiguousarray(photo[y : y + side, x : x + side])).save(
                    d / f"{i:03d}.jpg", quality=92
                )
    (root / ".complete").write_text(str(n))
    return root


# ----------------------------------------------------------------------------------------------- features


VARIANTS = {"exact": None, "dct ≥1×": 1, "dct ≥2×": 2}


def _probe(root: Path, fm, engine) -> dict[str, Any]:
    """Features of every file under each decode variant; differences to exact and a linear-probe accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from pipeline.data.decode import decode_image
    from pipeline.data.preprocess import resize_images

    files = sorted(p for p in root.rglob("*.jpg"))
    labels = np.array([sorted({f.parent.name for f in files}).index(f.parent.name) for f in files])
    size = fm.image_size
    layer = fm.layers[0]
    feats: dict[str, np.ndarray] = {}
    shapes: dict[str, list] = {}
    for name, margin in VARIANTS.items():
        req = None if margin is None else (margin * size, margin * size)
        xs, shp = [], []
        for f in files:
            img = decode_image(f, reduce_to=req)
            shp.append(img.shape[0] * img.shape[1])
            xs.append(np.asarray(resize_images(img, size)))
        x = np.stack(xs)
        feats[name] = np.concatenate([engine(x[i : i + 32])[layer] for i in range(0, len(x), 32)])
        shapes[name] = shp
    ref = feats["exact"]
    out = {"files": len(files), "classes": int(labels.max() + 1), "image_size": size, "variants": {}}
    cv = StratifiedKFold(min(5, int(np.bincount(labels).min())), shuffle=True, random_state=0)
    out["folds"] = cv.get_n_splits()
    for name, f in feats.items():
        rel = np.abs(f - ref).max(1) / np.abs(ref).max(1)
        cos = np.sum(f * ref, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        with threadpool_limits(
            1
        ):  # BLAS threads spin-waiting on a shared machine make small fits ~20× slower
            acc = cross_val_score(clf, f, labels, cv=cv)
        out["variants"][name] = {
            "decoded_megapixels": _median(shapes[name]) / 1e6,
            "max_relative_diff": float(rel.max()),
            "median_relative_diff": float(np.median(rel)),
            "mean_cosine": float(cos.mean()),
            "probe_accuracy": float(acc.mean()),
            "probe_accuracy_std": float(acc.std()),
        }
    return out


# ----------------------------------------------------------------------------------------------- CPU per photo


def _cpu_per_photo(
    files: list[Path], fm, engine, margins: dict[str, int | None]
) -> dict[str, dict[str, float]]:
    """Median process-time ms per photo of decode, shared resize (TensorFlow's op, and the compiled twin
    extraction uses when shrinking) and backbone (batch of 1), per variant."""
    import tensorflow as tf

    from pipeline.data.area import resize_array
    from pipeline.data.decode import decode_image
    from pipeline.data.preprocess import resize_images

    size = fm.image_size
    resize = tf.function(
        lambda a: resize_images(a, size), input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)]
    )
    out = {}
    for name, margin in margins.items():
        req = None if margin is None else (margin * size, margin * size)
        t = {"decode": [], "resize": [], "backbone": [], "compiled resize": []}
        for f in [files[0], *files]:  # the first is a warm-up
            raw = f.read_bytes()
            t0 = time.process_time()
            a = decode_image(raw, reduce_to=req)
            t1 = time.process_time()
            x = resize(a).numpy()
            t2 = time.process_time()
            engine(x[None])
            t3 = time.process_time()
            resize_array(a, size)
            t4 = time.process_time()
            for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                t[k].append(1000 * v)
        out[name] = {k: _median(v[1:]) for k, v in t.items()} | {"decoded_shape": list(a.shape[:2])}
    return out


def _non_jpeg_cost(src: Path, fm) -> dict[str, dict[str, float]]:
    """Full-size decode + resize CPU ms of one 12 MP photo saved as PNG and WebP (no DCT scaling exists)."""
    import tensorflow as tf
    from PIL import Image

    from pipeline.data.decode import decode_image
    from pipeline.data.preprocess import resize_images

    size = fm.image_size
    resize = tf.function(
        lambda a: resize_images(a, size), input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)]
    )
    img = Image.open(src)
    img.load()
    out = {}
    for fmt, kw in (("PNG", {"compress_level": 6}), ("WEBP", {"quality": 90})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        raw = buf.getvalue()
        dec, res = [], []
        for _ in range(4):
            t0 = time.process_time()
            a = decode_image(raw, reduce_to=(2 * size, 2 * size))  # the dct policy: no effect on these
            t1 = time.process_time()
            resize(a).numpy()
            t2 = time.process_time()
            dec.append(1000 * (t1 - t0))
            res.append(1000 * (t2 - t1))
        out[fmt.lower()] = {"decode": _median(dec[1:]), "resize": _median(res[1:]), "bytes": len(raw)}
    return out


# ----------------------------------------------------------------------------------------------- speed


SPEED_PATHS = ("bare tflite", "extract 500×375", "extract 12 MP exact", "extract 12 MP dct")


def _speed(
    photos: Path, n_small: int, large: Path, n_large: int, fm, lite, threads, engines_cache, reps, quiet
):
    from benchmarks.bench_engines import _decoded_batches

    batches = _decoded_batches(str(photos), n_small, fm, 16)
    runs: dict[str, list[dict]] = {p: [] for p in SPEED_PATHS}
    for rep in range(reps):
        for path in SPEED_PATHS:
            quiet.wait()
            if path == "bare tflite":
                r = _forward(lite, batches)
            elif path == "extract 500×375":
                r = _extract(str(photos), n_small, "auto", threads, engines_cache, decode="dct")
            else:
                policy = path.rsplit(" ", 1)[1]
                r = _extract(str(large), n_large, "auto", threads, engines_cache, decode=policy)
            runs[path].append(r)
        print(
            f"  [decode rep {rep + 1}/{reps}] "
            + " · ".join(f"{p} {runs[p][-1]['images_per_s']:.0f}/s" for p in SPEED_PATHS),
            file=sys.stderr,
            flush=True,
        )

    def ratio(a: str, b: str) -> float:
        return _median(x["images_per_s"] / y["images_per_s"] for x, y in zip(runs[a], runs[b], strict=True))

    return {
        "repetitions": reps,
        "rows": {
            p: {
                "images_per_s": _median(r["images_per_s"] for r in rs),
                "cpu_ms_per_image": _median(r["cpu_ms_per_image"] for r in rs),
                "foreign_cores": _median(r["foreign_cores"] for r in rs),
            }
            for p, rs in runs.items()
        },
        "ratios": {
            "12mp_dct_over_500x375": ratio("extract 12 MP dct", "extract 500×375"),
            "12mp_exact_over_500x375": ratio("extract 12 MP exact", "extract 500×375"),
            "12mp_dct_over_exact": ratio("extract 12 MP dct", "extract 12 MP exact"),
            "500x375_over_bare_tflite": ratio("extract 500×375", "bare tflite"),
        },
        "raw": runs,
    }


# ----------------------------------------------------------------------------------------------- main


def run(out_dir: Path, quick: bool) -> dict:
    import tensorflow as tf

    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import load_or_convert
    from pipeline.utils.config import BackboneConfig
    from pipeline.utils.workers import usable_cores

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    threads = usable_cores()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    n_small, n_large = (256, 32) if quick else (500, 48)
    reps = 1 if quick else 5  # this ratio is bimodal from run to run (0.77–0.81 or 0.87–0.90): 5, not 3
    quiet = Quiet(0 if quick else 30)
    photos = make_photos(OUT / f"photos-{n_small}", n_small)
    large = make_large_photos(OUT / f"photos-12mp-{n_large}", n_large)
    probe_root = make_probe_set(OUT / f"probe-12mp-{3 if quick else 6}", 3 if quick else 6, (4032, 3024))
    natural_root = make_natural_set(OUT / f"probe-natural-{4 if quick else 10}", 4 if quick else 10)

    fm = build_feature_model(BackboneConfig(name="efficientnet_lite0"))
    fm64 = build_feature_model(BackboneConfig(name="efficientnet_lite0", image_size=64))
    engines_root = Path(tempfile.mkdtemp(prefix="bench-decode-", dir=OUT))
    engines_cache = engines_root / "engines"
    engines_cache.mkdir()
    try:
        lite, _ = load_or_convert(fm, threads, engines_root, verbose=False)
        lite64, _ = load_or_convert(fm64, threads, engines_root, verbose=False)
        speed = _speed(photos, n_small, large, n_large, fm, lite, threads, engines_cache, reps, quiet)
        print("  speed done", file=sys.stderr, flush=True)
        margins = {"exact": None, "dct ≥1×": 1, "dct ≥2×": 2}
        large_files = sorted(large.rglob("*.jpg"))[:12]
        small_files = sorted(photos.rglob("*.jpg"))[:48]
        cpu = {
            "12 MP JPEG": _cpu_per_photo(large_files, fm, lite, margins),
            "500×375 JPEG": _cpu_per_photo(small_files, fm, lite, margins),
        }
        non_jpeg = _non_jpeg_cost(large_files[0], fm)
        probe = _probe(probe_root, fm, lite)
        natural = _probe(natural_root, fm64, lite64)
    finally:
        shutil.rmtree(engines_root, ignore_errors=True)
    result = {
        "benchmark": "decode",
        "quick": quick,
        "threads": threads,
        "dct_margin_default": _dct_margin(),
        "speed": speed,
        "cpu_ms_per_photo": cpu,
        "non_jpeg_12mp": non_jpeg,
        "probe_12mp_upscaled": probe,
        "probe_natural": natural,
        "seconds": time.perf_counter() - t_start,
        "waited_for_quiet_s": quiet.waited,
    }
    (out_dir / "decode.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _dct_margin() -> int:
    from pipeline.data.decode import DCT_MARGIN

    return DCT_MARGIN


def markdown(result: dict) -> str:
    s = result["speed"]
    rows, r = s["rows"], s["ratios"]
    lines = [
        f"Decode policy (`data.decode`): EfficientNet-Lite0, 224 px, `extract` with engine auto, {result['threads']} "
        f"threads, {'quick' if result['quick'] else 'full'} run, {s['repetitions']} interleaved repetitions (medians; "
        f"ratios are medians of per-repetition ratios). Default `dct` = the smallest DCT scale ≥ "
        f"{result['dct_margin_default']}× the input.",
        "",
        "| path | images/s | CPU ms/image | other load |",
        "|---|---:|---:|---:|",
    ]
    for p, v in rows.items():
        lines.append(
            f"| {p} | {v['images_per_s']:.0f} | {v['cpu_ms_per_image']:.1f} | {v['foreign_cores']:.2f} cores |"
        )
    lines += [
        "",
        f"Ratios: 12 MP `dct` ÷ 500×375 extraction **{r['12mp_dct_over_500x375']:.2f}** (12 MP `exact` ÷ 500×375: "
        f"{r['12mp_exact_over_500x375']:.2f}; `dct` ÷ `exact` on 12 MP: {r['12mp_dct_over_exact']:.2f}×); "
        f"500×375 extraction ÷ bare TFLite forward **{r['500x375_over_bare_tflite']:.2f}**.",
        "",
        "CPU per photo (process time, ms; backbone = TFLite, batch of 1; resize = TensorFlow's op as finetune "
        "and exported models run it, compiled = the bit-identical kernel extraction uses when shrinking):",
        "",
        "| photos | decode | decoded to | decode ms | resize ms | compiled resize ms | backbone ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for kind, variants in result["cpu_ms_per_photo"].items():
        for name, v in variants.items():
            h, w = v["decoded_shape"]
            lines.append(
                f"| {kind} | {name} | {w}×{h} | {v['decode']:.1f} | {v['resize']:.1f} | "
                f"{v.get('compiled resize', float('nan')):.1f} | {v['backbone']:.1f} |"
            )
    nj = result["non_jpeg_12mp"]
    lines += [
        "",
        "Large non-JPEG files (same 12 MP photo; always decoded at full size): "
        + "; ".join(
            f"{k.upper()} {v['decode']:.0f} ms decode + {v['resize']:.0f} ms resize ({v['bytes'] / 1e6:.1f} MB)"
            for k, v in nj.items()
        )
        + ".",
    ]
    for key, title in (
        ("probe_12mp_upscaled", "real photos upscaled to 12 MP (stated: upscaled, JPEG q=92)"),
        ("probe_natural", "real photos at natural resolution (260–400 px crops, no upscaling)"),
    ):
        p = result[key]
        lines += [
            "",
            f"Features and linear probe, {title}: {p['files']} files, {p['classes']} classes, "
            f"{p['image_size']} px; logistic regression on standardized features, {p.get('folds', 5)}-fold CV.",
            "",
            "| decode | decoded MP (median) | max rel. feature diff vs exact | median rel. diff | mean cosine | probe accuracy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, v in p["variants"].items():
            lines.append(
                f"| {name} | {v['decoded_megapixels']:.2f} | {v['max_relative_diff']:.3f} | "
                f"{v['median_relative_diff']:.3f} | {v['mean_cosine']:.4f} | "
                f"{v['probe_accuracy']:.3f} ± {v['probe_accuracy_std']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    result = run(args.out, args.quick)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
