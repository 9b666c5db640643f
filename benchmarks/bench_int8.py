"""Full-integer int8 (``extract.engine=tflite-int8``) against float32 TFLite: speed, features, accuracy.

    python -m benchmarks --only int8             # ~4 minutes on 2 cores
    python -m benchmarks --only int8 --quick     # a smoke run of the numbers
    python -m benchmarks.bench_int8 --families   # one backbone per family: the table behind INT8_REFUSED

Every speed is a ratio measured in the same run, int8 and float32 interleaved repetition by repetition (the
machine may be shared). Per backbone:

* **EfficientNet-Lite0** (its ImageNet weights, 224 px): the bare pass on decoded photos in memory and the
  whole ``extract()`` call on ~500×375 JPEGs, int8 ÷ float32; the mean / min feature cosine to float32 and a
  logistic head's test accuracy on Fashion-MNIST (int8 calibrated on the dataset's own train images, as
  ``extract`` does); the top-1 / top-5 agreement of Lite0's own ImageNet classifier, fed int8 features of
  the 13 reference photos, with the original model's logits; and the feature cosine for a few calibration
  sizes (how ``extract.calibration``'s default was chosen).
* **MobileNetV2** (random weights: its ImageNet weights cannot be downloaded here): the bare pass only. With
  random weights its features vanish (~1e-12), so int8 rounds them to zero and nothing about accuracy can
  be measured; the engine refuses such a model (mean cosine check), so there is no whole-extraction figure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_engines import OUT, Quiet, _decoded_batches, _extract, _forward, _median, make_photos

SHARED = Path(os.environ.get("FEATCACHE_SHARED") or Path(__file__).resolve().parents[1] / ".." / "shared")
REFERENCE = SHARED / "data" / "reference"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def _lite_models(fm, threads: int, root: Path, calibration):
    from pipeline.features.engines import load_or_convert

    f32, _ = load_or_convert(fm, threads, root, verbose=False)
    t = time.perf_counter()
    i8, meta = load_or_convert(fm, threads, root, quantize="int8", calibration=calibration, verbose=False)
    return f32, i8, {"seconds": time.perf_counter() - t, "bytes": meta["bytes"]}


def bare_pass(f32, i8, batches, reps: int) -> dict[str, Any]:
    """Images/s of both engines over the same in-memory batches, interleaved; the ratio per repetition."""
    runs = {"float32": [], "int8": []}
    for _ in range(reps):
        for name, engine in (("float32", f32), ("int8", i8)):
            runs[name].append(_forward(engine, batches)["images_per_s"])
    ratios = [b / a for a, b in zip(runs["float32"], runs["int8"], strict=True)]
    return {
        "images_per_s": {k: _median(v) for k, v in runs.items()},
        "ratios": ratios,
        "ratio": _median(ratios),
    }


def whole_extraction(
    fm, photos: Path, n: int, reps: int, threads: int, engines_cache: Path
) -> dict[str, Any]:
    """``extract()`` into fresh caches (converted models reused), tflite and tflite-int8 interleaved."""
    from pipeline.data.sources import load_dataset
    from pipeline.features.calibration import for_config
    from pipeline.features.engines import load_or_convert
    from pipeline.utils.config import load_config

    cfg = load_config(None, {"data.source": str(photos), "data.limit": n, "extract.engine": "tflite-int8"})
    calibration = for_config(cfg, load_dataset(cfg.data))  # converted before the timing, as after a first run
    load_or_convert(
        fm, threads, engines_cache.parent, quantize="int8", calibration=calibration, verbose=False
    )
    runs = {"tflite": [], "tflite-int8": []}
    for _ in range(reps):
        for engine in runs:
            runs[engine].append(_extract(str(photos), n, engine, threads, engines_cache))
    ratio = [
        b["images_per_s"] / a["images_per_s"]
        for a, b in zip(runs["tflite"], runs["tflite-int8"], strict=True)
    ]
    e2e = [
        b["end_to_end_images_per_s"] / a["end_to_end_images_per_s"]
        for a, b in zip(runs["tflite"], runs["tflite-int8"], strict=True)
    ]
    return {
        "images": n,
        "images_per_s": {k: _median([r["images_per_s"] for r in v]) for k, v in runs.items()},
        "ratios": ratio,
        "ratio": _median(ratio),
        "end_to_end_ratio": _median(e2e),
    }


def fashion_mnist_head(limit: int, threads: int, cache: Path) -> dict[str, Any]:
    """Both engines through ``extract()`` on Fashion-MNIST, then one logistic head per cache: test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.cache.store import FeatureCache
    from pipeline.stages.extract import extract

    out: dict[str, Any] = {}
    feats = {}
    for engine in ("tflite", "tflite-int8"):
        r = extract(
            data__source="fashion_mnist",
            data__limit=limit,
            extract__cache_dir=str(cache),
            extract__engine=engine,
            extract__threads=threads,
            extract__progress=False,
        )
        with FeatureCache(r.path) as c:
            x, y, split = c.features(), np.asarray(c.labels), np.asarray(c.split)
            calibration = (c.meta["feature_key"].get("engine") or {}).get("calibration")
        train, test = split == 0, split == 2
        scaler = StandardScaler().fit(x[train])
        head = LogisticRegression(max_iter=1000, C=0.1).fit(scaler.transform(x[train]), y[train])
        out[engine] = {
            "extract_images_per_s": r.images_per_second,
            "test_accuracy": float(head.score(scaler.transform(x[test]), y[test])),
            "calibration": calibration,
        }
        feats[engine] = x
        out.update(train_images=int(train.sum()), test_images=int(test.sum()))
    cos = _cosines(feats["tflite"], feats["tflite-int8"])
    out.update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
    out["accuracy_lost_points"] = 100 * (out["tflite"]["test_accuracy"] - out["tflite-int8"]["test_accuracy"])
    return out


def imagenet_agreement(fm, f32, i8) -> dict[str, Any] | None:
    """Lite0's own classifier on float32 and int8 features of the reference photos, against the original
    model's logits: how often its top-1 class is the original's top-1 (top-1) or among the top 5 (top-5)."""
    path = REFERENCE / "efficientnet_lite0_reference.npz"
    if not path.is_file():
        return None
    from pipeline.features.backbones.efficientnet_lite import build_efficientnet_lite0

    ref = np.load(path)
    x, want = ref["images"].astype(np.float32), ref["logits"].argmax(1)
    dense = build_efficientnet_lite0(include_top=True, weights="imagenet").get_layer("predictions")
    out = {"photos": len(x)}
    layer = fm.layers[0]
    for name, engine in (("float32", f32), ("int8", i8)):
        logits = np.asarray(dense(engine(x)[layer]))
        top5 = np.argsort(-logits, 1)[:, :5]
        out[name] = {
            "top1": float(np.mean(top5[:, 0] == want)),
            "top5": float(np.mean((top5 == want[:, None]).any(1))),
        }
    a, b = f32(x)[layer], i8(x)[layer]
    out["mean_cosine"] = float(_cosines(a, b).mean())
    return out


def calibration_sizes(fm, threads: int, sizes: tuple[int, ...], root: Path) -> list[dict[str, Any]]:
    """The int8 features' cosine to float32 on 256 Fashion-MNIST test images, per calibration size."""
    from pipeline.data.images import make_image_dataset
    from pipeline.data.sources import load_dataset
    from pipeline.features.calibration import for_config
    from pipeline.features.engines import load_or_convert
    from pipeline.utils.config import load_config

    ds = load_dataset(load_config(None, {"data.source": "fashion_mnist"}).data)
    test = [s for s in ds.samples if s.split == "test"][:256]
    x = np.concatenate(
        [
            im.numpy()
            for _, im, _, _ in make_image_dataset(ds, test, fm.image_size, "stretch", 64, decode="dct")
        ]
    )
    f32, _ = load_or_convert(fm, threads, root, verbose=False)
    want = f32(x)[fm.layers[0]]
    rows = []
    for n in sizes:
        cfg = load_config(None, {"extract.engine": "tflite-int8", "extract.calibration": n})
        t = time.perf_counter()
        i8, _ = load_or_convert(
            fm, threads, root, quantize="int8", calibration=for_config(cfg, ds), verbose=False
        )
        seconds = time.perf_counter() - t
        cos = _cosines(want, i8(x)[fm.layers[0]])
        rows.append(
            {
                "images": n,
                "convert_seconds": seconds,
                "mean_cosine": float(cos.mean()),
                "min_cosine": float(cos.min()),
            }
        )
    return rows


def mobilenet_v2_bare(threads: int, reps: int, batches) -> dict[str, Any]:
    """MobileNetV2 (random weights) at 224 px: int8 against float32, the bare pass only (see the docstring)."""
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import TFLiteEngine, convert
    from pipeline.features.probes import probe_images
    from pipeline.utils.config import BackboneConfig

    fm = build_feature_model(BackboneConfig(name="mobilenet_v2", weights="none"))
    blob, outputs = convert(fm)
    blob8, _ = convert(fm, "int8", probe_images(fm.image_size, 32))
    f32 = TFLiteEngine(blob, fm.layers, outputs, threads)
    i8 = TFLiteEngine(blob8, fm.layers, outputs, threads, name="tflite-int8")
    scale = float(np.abs(f32(batches[0])[fm.layers[0]]).max())
    return {**bare_pass(f32, i8, batches, reps), "float32_feature_max": scale}


FAMILIES = (
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_b0",
    "resnet50",
    "resnet50v2",
)
FAMILIES += ("densenet121", "inception_v3", "vgg16", "convnext_tiny")


def families(names=FAMILIES, size: int = 96) -> list[dict[str, Any]]:
    """One backbone per family, random weights at ``size`` px: int8's feature cosine to float32 TFLite on the
    13 reference photos and its speed ratio (best of 3, interleaved): the table behind ``INT8_REFUSED``."""
    from pipeline.data.preprocess import resize_images
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import TFLiteEngine, convert
    from pipeline.features.probes import best_rates, probe_images
    from pipeline.utils.config import BackboneConfig

    photos = np.load(REFERENCE / "efficientnet_lite0_reference.npz")["images"]
    x = np.stack([np.asarray(resize_images(p, size)) for p in photos]).astype(np.float32)
    rows = []
    for name in names:
        fm = build_feature_model(BackboneConfig(name=name, weights="none", image_size=size))
        blob, outputs = convert(fm)
        blob8, _ = convert(fm, "int8", probe_images(size, 16))
        f32 = TFLiteEngine(blob, fm.layers, outputs, 0)
        i8 = TFLiteEngine(blob8, fm.layers, outputs, 0, name="tflite-int8")
        cos = _cosines(f32(x)[fm.layers[0]], i8(x)[fm.layers[0]])
        rate_f32, rate_i8 = best_rates([f32, i8], x, reps=3)
        row = {"backbone": name, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
        rows.append({**row, "speedup": rate_i8 / rate_f32})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run(out_dir: Path, quick: bool) -> dict:
    import tensorflow as tf

    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.calibration import from_probe
    from pipeline.utils.config import BackboneConfig
    from pipeline.utils.workers import usable_cores

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    threads = usable_cores()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    reps, n_photos, limit = (1, 64, 1200) if quick else (5, 256, 6000)
    quiet = Quiet(0 if quick else 30)
    photos = make_photos(OUT / f"photos-{n_photos}", n_photos)
    root = Path(tempfile.mkdtemp(prefix="bench-int8-", dir=OUT))
    try:
        fm = build_feature_model(BackboneConfig())
        batches = _decoded_batches(str(photos), n_photos, fm, 2 if quick else 4)
        f32, i8, conversion = _lite_models(fm, threads, root, from_probe(32))
        quiet.wait()
        lite = {
            "conversion": conversion,
            "bare": bare_pass(f32, i8, batches, reps),
            "extract": whole_extraction(fm, photos, n_photos, max(1, reps - 2), threads, root / "engines"),
            "imagenet": imagenet_agreement(fm, f32, i8),
            "calibration_sizes": calibration_sizes(fm, threads, (8, 32) if quick else (8, 32, 128), root),
            "fashion_mnist": fashion_mnist_head(limit, threads, root / "fmnist"),
        }
        mnv2 = mobilenet_v2_bare(threads, reps, batches)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "int8",
        "threads": threads,
        "quick": quick,
        "efficientnet_lite0": lite,
        "mobilenet_v2_random": mnv2,
        "seconds": time.perf_counter() - t0,
    }
    (Path(out_dir) / "int8.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def markdown(result: dict) -> str:
    lite, mnv2 = result["efficientnet_lite0"], result["mobilenet_v2_random"]
    b, e, f = lite["bare"], lite["extract"], lite["fashion_mnist"]
    rows = [
        "`extract.engine=tflite-int8` (full-integer int8, float32 in and out) against float32 TFLite, "
        f"{result['threads']} threads, interleaved repetitions; ratios are medians of per-repetition int8 ÷ float32.",
        "",
        "| backbone | measure | float32 | int8 | int8 ÷ float32 |",
        "|---|---|---:|---:|---:|",
        f"| efficientnet_lite0 (ImageNet, 224 px) | bare pass, images/s ({len(b['ratios'])} reps) | "
        f"{b['images_per_s']['float32']:.0f} | {b['images_per_s']['int8']:.0f} | **{b['ratio']:.2f}×** |",
        f"| | whole `extract`, {e['images']} JPEGs ~500×375, images/s ({len(e['ratios'])} reps) | "
        f"{e['images_per_s']['tflite']:.0f} | {e['images_per_s']['tflite-int8']:.0f} | **{e['ratio']:.2f}×** "
        f"(end to end {e['end_to_end_ratio']:.2f}×) |",
        f"| | `extract` Fashion-MNIST ({f['train_images']} train / {f['test_images']} test), images/s (1 run) | "
        f"{f['tflite']['extract_images_per_s']:.0f} | {f['tflite-int8']['extract_images_per_s']:.0f} | "
        f"{f['tflite-int8']['extract_images_per_s'] / f['tflite']['extract_images_per_s']:.2f}× |",
        f"| | feature cosine to float32, Fashion-MNIST (mean / min) | 1 | {f['mean_cosine']:.4f} / {f['min_cosine']:.3f} | |",
        f"| | logistic head test accuracy, Fashion-MNIST | {f['tflite']['test_accuracy']:.4f} | "
        f"{f['tflite-int8']['test_accuracy']:.4f} | {f['accuracy_lost_points']:+.2f} points lost |",
    ]
    g = lite.get("imagenet")
    if g:
        rows.append(
            f"| | own ImageNet classifier vs the original logits, {g['photos']} reference photos: top-1 / top-5 | "
            f"{g['float32']['top1']:.3f} / {g['float32']['top5']:.3f} | {g['int8']['top1']:.3f} / {g['int8']['top5']:.3f} | "
            f"cosine {g['mean_cosine']:.4f} |"
        )
    m = mnv2
    rows.append(
        f"| mobilenet_v2 (random weights, 224 px) | bare pass, images/s ({len(m['ratios'])} reps) | "
        f"{m['images_per_s']['float32']:.0f} | {m['images_per_s']['int8']:.0f} | **{m['ratio']:.2f}×** |"
    )
    rows += [
        "",
        f"Per-repetition ratios: Lite0 bare {', '.join(f'{r:.2f}' for r in b['ratios'])}; whole extract "
        f"{', '.join(f'{r:.2f}' for r in e['ratios'])}; MobileNetV2 bare {', '.join(f'{r:.2f}' for r in m['ratios'])}. "
        f"Lite0 int8 conversion (calibration included): {lite['conversion']['seconds']:.1f} s, "
        f"{lite['conversion']['bytes'] / 1e6:.1f} MB. MobileNetV2's random-weight features peak at "
        f"{m['float32_feature_max']:.1g}: no accuracy can be measured on them.",
        "",
        "Calibration size (Lite0, Fashion-MNIST train images, cosine to float32 on 256 test images):",
        "",
        "| calibration images | conversion s | mean cosine | min cosine |",
        "|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {c['images']} | {c['convert_seconds']:.1f} | {c['mean_cosine']:.4f} | {c['min_cosine']:.3f} |"
        for c in lite["calibration_sizes"]
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    if "--families" in sys.argv:  # python -m benchmarks.bench_int8 --families
        for r in families():
            print(
                f"| {r['backbone']} | {r['mean_cosine']:.4f} / {r['min_cosine']:.4f} | {r['speedup']:.2f}× |"
            )
    else:
        print(markdown(run(OUT, "--quick" in sys.argv)))
