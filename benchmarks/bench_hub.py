"""KerasHub ViTs: featcache extraction against the bare forward pass of the same model and engine (issue 27).

    python -m benchmarks --only hub                 # ~5 minutes on 2 cores
    python -m benchmarks --only hub --quick         # a smoke run of the numbers
    python -m benchmarks.bench_hub --vit-b-layers 12   # ViT-B/16 at its full depth (~10 minutes)

Two random-weight KerasHub models at 224 px, each saved with KerasHub's own ``save_to_preset`` (backbone and
image converter) into a folder and named by it, as ``tests/test_keras_hub.py`` does (the code path of a
downloaded preset):

* **ViT-S/14**: ``DINOV2Backbone``, hidden 384, 12 layers, 6 heads, MLP 1536, patch 14 (``dinov2_small``'s
  shape, its 518-px position embeddings interpolated to 224 px as the preset's are);
* **ViT-B/16**: ``ViTBackbone``, hidden 768, 12 heads, MLP 3072, patch 16, with :data:`VIT_B_LAYERS` of its
  12 layers by default: at 12 layers it runs ~4 images/s here and converts in ~100 s, which does not fit the
  section's few minutes (``--vit-b-layers 12`` runs it whole). Fewer layers is the harder case for the ratio:
  the same per-image overhead against less backbone work.

Per model and engine (``tensorflow``, ``tflite``), interleaved repetition by repetition (the order reversed
every other repetition), so load from other processes hits every column alike:

* ``bare``: the engine (:func:`pipeline.features.engines.make_engine` / ``load_or_convert``) called on the
  prepared batches: the same files decoded and resized by featcache's own reader, float32 in memory,
  warmed up first;
* ``extract``: :func:`pipeline.stages.extract.extract` on the same files (224-px crops of scikit-learn's two
  sample photos, JPEG and PNG alternately) into a fresh cache, the converted model reused from a warm engine
  cache. ``steady`` is its rate after the first batch (timed by the progress bar ``extract`` takes), the
  figure comparable to the warmed-up bare pass; ``as reported`` is what ``extract`` says (its whole
  decode→backbone→write loop: the first batch's tracing / allocation included); ``end to end`` divides by the
  whole call (model build, digests, final HDF5 included).

Ratios are medians over repetitions of extract ÷ the bare pass of the same engine measured moments before.
Also: conversion time (the converter, and with featcache's validation on the probe photos), the benchmark
process's peak RSS while converting, and the peak RSS of a whole ``featcache extract`` process per engine
(:mod:`benchmarks.peak_rss`, converted model cached).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_engines import OUT, Meter, _complete, _median
from benchmarks.peak_rss import peak_rss

REPO = Path(__file__).resolve().parents[1]
SIZE = 224
BATCH = 16
ENGINES = ("tensorflow", "tflite")
GOAL = 0.9  # issue 27: extraction >= 0.9x the bare pass of the same engine
VIT_B_LAYERS = 4
IMAGENET = {
    "scale": [1 / (255 * s) for s in (0.229, 0.224, 0.225)],
    "offset": [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)],
}
HALF = {"scale": 1 / 127.5, "offset": -1.0}


def models(vit_b_layers: int = VIT_B_LAYERS) -> list[dict[str, Any]]:
    return [
        {
            "key": "vit_s14",
            "label": "ViT-S/14 (DINOv2, 12 layers)",
            "family": "DINOV2",
            "layers": 12,
            "kwargs": {"patch_size": 14, "hidden_dim": 384, "num_heads": 6, "intermediate_dim": 1536},
            "norm": IMAGENET,
        },
        {
            "key": f"vit_b16_l{vit_b_layers}",
            "label": f"ViT-B/16 (ViT, {vit_b_layers} of 12 layers)",
            "family": "ViT",
            "layers": vit_b_layers,
            "kwargs": {"patch_size": 16, "hidden_dim": 768, "num_heads": 12, "mlp_dim": 3072},
            "norm": HALF,
        },
    ]


# ----------------------------------------------------------------------------------------------- inputs


def save_preset(folder: Path, model: dict[str, Any]) -> Path:
    """A random-weight backbone and its image converter, written by KerasHub's ``save_to_preset``."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    shape = (SIZE, SIZE, 3)
    if model["family"] == "DINOV2":
        backbone = keras_hub.models.DINOV2Backbone(
            num_layers=model["layers"], image_shape=shape, **model["kwargs"]
        )
    else:
        backbone = keras_hub.models.ViTBackbone(
            num_layers=model["layers"], image_shape=shape, **model["kwargs"]
        )
    backbone.save_to_preset(str(folder))
    converter = getattr(keras_hub.layers, f"{model['family']}ImageConverter")
    converter(image_size=(SIZE, SIZE), **model["norm"]).save_to_preset(str(folder))
    return folder


def make_photos_224(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` square 224-px crops (random size and place, flips) of sklearn's two sample photos, JPEG (q=90)
    and PNG alternately, in one class folder per photo. Reused when already complete."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if _complete(root, n):
        return root
    sample = load_sample_images()
    names = [Path(f).stem for f in sample.filenames]
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(names)
        img = Image.fromarray(sample.images[c])
        w, h = img.size
        side = int(rng.uniform(0.35, 1.0) * min(w, h))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        im = img.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        if i % 2:
            im.save(d / f"{i:05d}.png")
        else:
            im.save(d / f"{i:05d}.jpg", quality=90)
    (root / ".complete").write_text(str(n))
    return root


def prepared_batches(photos: Path, n: int, fm) -> list[np.ndarray]:
    """The same files as extraction reads, decoded and resized by its own reader: float32 batches in memory."""
    from pipeline.data.images import numpy_batches
    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    ds = load_dataset(DataConfig(source=str(photos), limit=n))
    batches = numpy_batches(ds, ds.samples, fm.image_size, "stretch", BATCH, decode="dct")
    return [np.ascontiguousarray(images, np.float32) for _, images, _, _ in batches]


# ----------------------------------------------------------------------------------------------- timing


class StampBar:
    """A progress "bar" for ``extract(progress_bar=...)``: the time each batch is counted, for a steady rate."""

    def __init__(self):
        self.stamps: list[tuple[float, int]] = []

    def update(self, n: int = 1) -> None:
        self.stamps.append((time.perf_counter(), int(n)))

    def steady_rate(self) -> float:
        """Images/s after the first batch (its tracing / allocation left out)."""
        if len(self.stamps) < 2:
            return float("nan")
        images = sum(n for _, n in self.stamps[1:])
        return images / (self.stamps[-1][0] - self.stamps[0][0])


def bare(engine, batches: list[np.ndarray]) -> dict[str, float]:
    engine(batches[0])  # warm-up: the engine is reused from one repetition to the next
    with Meter() as m:
        for b in batches:
            engine(b)
    return m.result(sum(len(b) for b in batches))


def extract_once(photos: Path, n: int, folder: Path, engine: str, threads: int, engines: Path) -> dict:
    from pipeline.features import engines as engines_module
    from pipeline.stages.extract import extract

    conversions = engines_module.conversions

    with tempfile.TemporaryDirectory(prefix="bench-hub-", dir=OUT) as tmp:
        (Path(tmp) / "engines").symlink_to(engines, target_is_directory=True)
        bar = StampBar()
        with Meter() as m:
            r = extract(
                progress_bar=bar,
                data__source=str(photos),
                data__limit=n,
                backbone__name=str(folder),
                extract__cache_dir=tmp,
                extract__engine=engine,
                extract__threads=threads,
                extract__batch_size=BATCH,
                extract__progress=False,
                extract__lock_timeout=0,
            )
    if engines_module.conversions != conversions:  # the bare pass's model must be the one extract runs
        raise RuntimeError(f"extract {engine} converted the model again: not the benchmarked model")
    if r.extracted != n or r.skipped:
        raise RuntimeError(f"extract {engine}: {r.extracted} of {n} images extracted, {r.skipped} skipped")
    return {
        "images_per_s": bar.steady_rate(),
        "reported_images_per_s": r.images_per_second,
        "end_to_end_images_per_s": m.result(n)["images_per_s"],
        "foreign_cores": m.foreign,
        "used": r.engine,
    }


def _hwm_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def extract_peak_rss(photos: Path, n: int, folder: Path, engine: str, threads: int, engines: Path) -> dict:
    """Peak RSS of a whole ``featcache extract`` process (converted model cached, so no conversion)."""
    with tempfile.TemporaryDirectory(prefix="bench-hub-rss-", dir=OUT) as tmp:
        (Path(tmp) / "engines").symlink_to(engines, target_is_directory=True)
        args = ["extract", "--data", str(photos), "--limit", str(n), "--backbone", str(folder)]
        args += ["--cache-dir", tmp, "--batch-size", str(BATCH), "--threads", str(threads), "--quiet"]
        args += ["--set", f"extract.engine={engine}"]
        t = time.perf_counter()
        rss, _, _ = peak_rss(args, cwd=REPO)
    return {"images": n, "peak_rss_mib": round(rss, 1), "seconds": round(time.perf_counter() - t, 1)}


# ----------------------------------------------------------------------------------------------- one model


def feature_model(folder: Path):
    """The feature model ``extract`` builds for the preset in ``folder``: the same config, settled the same
    way (absolute folder, the family's default pooling), the preset's own (random) weights."""
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.backbones.hub_presets import settle
    from pipeline.features.backbones.registry import get_spec
    from pipeline.utils.config import given_keys, load_config

    cfg = load_config(None, {"backbone.name": str(folder), "extract.batch_size": BATCH})
    settle(cfg.backbone, given_keys(cfg), get_spec(cfg.backbone.name).preset)
    return build_feature_model(cfg.backbone, cfg.extract.precision), cfg.backbone.pooling


def bench_model(
    model: dict[str, Any], photos: Path, n: int, reps: int, threads: int, work: Path, rss_images: int
) -> dict[str, Any]:
    import keras

    from pipeline.features.engines import load_or_convert, make_engine

    folder = save_preset(work / model["key"], model)
    engines_root = work / f"engines-{model['key']}"
    engines = engines_root / "engines"
    engines.mkdir(parents=True)
    t = time.perf_counter()
    fm, pooling = feature_model(folder)
    build_s = time.perf_counter() - t
    params = int(sum(np.prod(w.shape) for w in fm.base.weights))
    batches = prepared_batches(photos, n, fm)

    gc.collect()
    rss_before, hwm_ok = _status_mib("VmRSS"), _hwm_reset()
    t = time.perf_counter()
    lite, meta = load_or_convert(fm, threads, engines_root, verbose=False)
    conversion = {
        "seconds": time.perf_counter() - t,  # conversion + featcache's validation on the probe photos
        "convert_seconds": meta["convert_seconds"],
        "bytes": meta["bytes"],
        "max_relative_diff": max(meta["max_relative_diff"].values()),
        "probe_speedup": meta["speedup"],
        "runtime": meta["runtime"],
        "process_peak_rss_mib": round(_status_mib("VmHWM"), 1) if hwm_ok else None,
        "process_rss_before_mib": round(rss_before, 1),
    }
    print(f"  [{model['key']}] converted: {json.dumps(conversion)}", file=sys.stderr, flush=True)
    bare_engines = {"tensorflow": make_engine(fm, "tensorflow", threads), "tflite": lite}
    paths = [("bare", e) for e in ENGINES] + [("extract", e) for e in ENGINES]
    runs: dict[str, list[dict]] = {f"{k} {e}": [] for k, e in paths}
    for rep in range(reps):
        for kind, engine in paths if rep % 2 == 0 else paths[::-1]:
            if kind == "bare":
                r = bare(bare_engines[engine], batches)
            else:
                r = extract_once(photos, n, folder, engine, threads, engines)
                if r["used"] != engine:
                    raise RuntimeError(f"extract ran {r['used']}, not {engine}")
            runs[f"{kind} {engine}"].append(r)
        print(
            f"  [{model['key']} rep {rep + 1}/{reps}] "
            + " · ".join(f"{k} {v[-1]['images_per_s']:.1f}/s" for k, v in runs.items())
            + f" · other load {_median([v[-1]['foreign_cores'] for v in runs.values()]):.2f} cores",
            file=sys.stderr,
            flush=True,
        )
    del bare_engines, lite
    rss = {e: extract_peak_rss(photos, rss_images, folder, e, threads, engines) for e in ENGINES}
    rows = []
    for engine in ENGINES:
        b, x = runs[f"bare {engine}"], runs[f"extract {engine}"]
        bare_rates = [r["images_per_s"] for r in b]

        def ratios(key: str, x=x, bare_rates=bare_rates) -> list[float]:
            return [r[key] / rate for r, rate in zip(x, bare_rates, strict=True)]

        steady = ratios("images_per_s")
        rows.append(
            {
                "engine": engine,
                "bare_images_per_s": _median(bare_rates),
                "extract_images_per_s": _median([r["images_per_s"] for r in x]),
                "reported_images_per_s": _median([r["reported_images_per_s"] for r in x]),
                "end_to_end_images_per_s": _median([r["end_to_end_images_per_s"] for r in x]),
                "ratios": steady,
                "ratio": _median(steady),
                "ratio_of_bests": max(r["images_per_s"] for r in x) / max(bare_rates),
                "reported_ratio": _median(ratios("reported_images_per_s")),
                "end_to_end_ratio": _median(ratios("end_to_end_images_per_s")),
                "foreign_cores": _median([r["foreign_cores"] for r in b + x]),
                "peak_rss_mib": rss[engine]["peak_rss_mib"],
                "met": _median(steady) >= GOAL,
            }
        )
    lite_tf = [
        a["images_per_s"] / b["images_per_s"]
        for a, b in zip(runs["bare tflite"], runs["bare tensorflow"], strict=True)
    ]
    result = {
        "key": model["key"],
        "label": model["label"],
        "class": f"{model['family']}Backbone",
        "layers": model["layers"],
        "params": params,
        "dim": int(sum(fm.dims.values())),
        "pooling": pooling,
        "build_seconds": build_s,
        "conversion": conversion,
        "rows": rows,
        "tflite_over_tensorflow_bare": _median(lite_tf),
        "peak_rss": rss,
        "raw": runs,
    }
    del fm, batches
    keras.backend.clear_session()
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------------- main


def run(out_dir: Path, quick: bool, vit_b_layers: int = VIT_B_LAYERS) -> dict:
    from pipeline.features.engines import configure_tf_threads
    from pipeline.utils.workers import usable_cores

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    threads = usable_cores()
    configure_tf_threads(threads)
    n, reps = (32, 1) if quick else (64, 3)
    photos = make_photos_224(OUT / f"photos-224-{n}", n)
    work = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=OUT))
    try:
        results = [
            bench_model(m, photos, n, reps, threads, work, rss_images=2 * BATCH) for m in models(vit_b_layers)
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "hub",
        "image_size": SIZE,
        "batch_size": BATCH,
        "images": n,
        "repetitions": reps,
        "threads": threads,
        "quick": quick,
        "goal": f"extract >= {GOAL}x the bare pass of the same engine (steady rate)",
        "models": results,
        "seconds": time.perf_counter() - t0,
    }
    name = "hub.json" if vit_b_layers == VIT_B_LAYERS else f"hub-vit-b-{vit_b_layers}-layers.json"
    (Path(out_dir) / name).write_text(json.dumps(result, indent=1, default=float))
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Random-weight KerasHub presets at {result['image_size']} px (folders written by `save_to_preset`), "
        f"{result['images']} files (224-px JPEG/PNG crops of the sample photos), batch {result['batch_size']}, "
        f"{result['threads']} threads, {result['repetitions']} interleaved repetitions. `bare` is the engine "
        "on the same images decoded into float32 batches in memory (warmed up); `extract` is "
        "`pipeline.stages.extract.extract` on the files into a fresh cache (converted model reused): `steady` "
        "after its first batch, `reported` its own figure (the first batch's tracing / allocation included: a "
        "one-time cost, large against 64 images), `end to end` the whole call (model build and final HDF5 "
        "too). Ratios: medians of per-repetition extract ÷ bare of the same engine; goal "
        f"≥ {GOAL}× (steady).",
        "",
        "| model | engine | bare images/s | extract steady / reported / end to end, images/s | "
        "**extract ÷ bare** (steady) | reported | end to end | peak RSS of `featcache extract` |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["models"]:
        for i, r in enumerate(m["rows"]):
            label = (
                f"{m['label']}, {m['params'] / 1e6:.1f} M params, `{m['pooling']}` {m['dim']}-d"
                if i == 0
                else ""
            )
            lines.append(
                f"| {label} | {r['engine']} | {r['bare_images_per_s']:.1f} | "
                f"{r['extract_images_per_s']:.1f} / {r['reported_images_per_s']:.1f} / "
                f"{r['end_to_end_images_per_s']:.1f} | **{r['ratio']:.2f}×** "
                f"({', '.join(f'{x:.2f}' for x in r['ratios'])}) | {r['reported_ratio']:.2f}× | "
                f"{r['end_to_end_ratio']:.2f}× | {r['peak_rss_mib']:.0f} MiB |"
            )
    lines += ["", "Conversion to TFLite (once per model, then cached):", ""]
    for m in result["models"]:
        c = m["conversion"]
        hwm = (
            f", the benchmark process peaked at {c['process_peak_rss_mib']:.0f} MiB while converting "
            f"(+{c['process_peak_rss_mib'] - c['process_rss_before_mib']:.0f} MiB over its RSS before)"
            if c["process_peak_rss_mib"]
            else ""
        )
        lines.append(
            f"- {m['label']}: {c['convert_seconds']:.1f} s converting, {c['seconds']:.1f} s with featcache's "
            f"validation; {c['bytes'] / 1e6:.0f} MB; max relative difference {c['max_relative_diff']:.1e} vs "
            f"TensorFlow{hwm}; bare TFLite ÷ bare TensorFlow {m['tflite_over_tensorflow_bare']:.2f}×."
        )
    met = all(r["met"] for m in result["models"] for r in m["rows"])
    load = _median([r["foreign_cores"] for m in result["models"] for r in m["rows"]])
    lines += [
        "",
        f"Goal (extract ≥ {GOAL}× the bare pass of the same engine): **{'met' if met else 'not met'}**. "
        f"Other processes kept {load:.2f} cores busy (median) during the measurements.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 images, 1 repetition")
    ap.add_argument(
        "--vit-b-layers", type=int, default=VIT_B_LAYERS, help="ViT-B/16 depth (12: the real one)"
    )
    args = ap.parse_args(argv)
    result = run(OUT, args.quick, args.vit_b_layers)
    print(markdown(result))
    print(f"\n(written to {OUT}/hub*.json in {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
