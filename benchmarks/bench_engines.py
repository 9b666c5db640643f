"""Engine benchmark: images/s of ``featcache extract`` with each engine, against the bare TensorFlow forward pass.

    python -m benchmarks.bench_engines            # full: 2,000 images per dataset, median of 3 runs
    python -m benchmarks.bench_engines --quick    # 256 images, 1 run (a smoke test of the numbers)
    python -m benchmarks.bench_engines --sweep    # every backbone: converts? feature difference, speed-up
    python -m benchmarks --only int8              # full-integer int8 vs float32 (benchmarks/bench_int8.py)

Two datasets: the built-in demo (Fashion-MNIST, 28×28 arrays, ``data.limit``) and a folder of natural JPEG
photos (~500×375, quality 90) generated once from scikit-learn's two sample photos with random crops,
flips and colour jitter into ``benchmarks/out/photos-N/`` (git-ignored). For each dataset, interleaved in
every repetition so machine load hits all columns alike:

* ``bare tensorflow``: compiled ``model(x, training=False)`` over decoded, resized batches in memory,
  same batch size: the reference every ratio divides by;
* ``bare tflite``: the converted model on the same in-memory batches;
* ``decode only``: the extraction input pipeline (read, decode, resize, batch) with no backbone;
* ``extract <engine>``: the full :func:`pipeline.stages.extract.extract` path (digests, decode, resize, backbone,
  background HDF5/part writes, final cache) into a fresh cache dir, progress off. ``stream`` is the
  rate extract reports (images / time of the decode→backbone→write loop); ``end-to-end`` divides by the
  whole call (model build and the final HDF5 included). Converted models are reused from a warm engine
  cache, as after a first run; the one-time conversion cost is reported separately.

Also reported: an explicit reduced-precision option (TFLite dynamic-range int8 weights) with its feature
error and downstream accuracy (logistic regression on Fashion-MNIST features) — a measurement, never a
default. Results go to ``benchmarks/out/engines.json``; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
BACKBONE = "efficientnet_lite0"
BATCH = 32
ENGINES = ("tensorflow", "tflite", "auto")


# ----------------------------------------------------------------------------------------------- data


def _complete(root: Path, n: int) -> bool:
    """Whether ``root`` holds a finished set of ``n`` generated photos; if not, clears what is there."""
    done = root / ".complete"
    if done.is_file() and done.read_text().strip() == str(n):
        return True
    if root.exists():
        shutil.rmtree(root)
    return False


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` natural JPEG photos (~500×375, q=90) in two class folders, from sklearn's sample photos.

    Random crops (40–100 % of the shorter side, 4:3 or 3:4), horizontal flips and brightness / contrast /
    saturation jitter, so every file is a different natural image that must really be decoded and
    resized. Reused when already complete.
    """
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    if _complete(root, n):
        return root
    sample = load_sample_images()
    names = [Path(f).stem for f in sample.filenames]  # china, flower
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(names)
        img = Image.fromarray(sample.images[c])
        w, h = img.size
        portrait = rng.random() < 0.25
        aspect = 3 / 4 if portrait else 4 / 3
        ch = int(rng.uniform(0.4, 1.0) * min(h, w / aspect))
        cw = int(ch * aspect)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out_size = (375, 500) if portrait else (500, 375)
        im = img.crop((left, top, left + cw, top + ch)).resize(out_size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:05d}.jpg", quality=90)
    (root / ".complete").write_text(str(n))
    return root


def _decoded_batches(source: str, limit: int, fm, batches: int) -> list:
    """The first ``batches`` batches of the extraction input pipeline, decoded and resized, in memory."""
    from pipeline.data.images import make_image_dataset
    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    ds = load_dataset(DataConfig(source=source, limit=limit))
    samples = ds.samples[: batches * BATCH]
    data = make_image_dataset(ds, samples, fm.image_size, "stretch", BATCH, decode="dct")
    return [images for _, images, _, _ in data]


# ----------------------------------------------------------------------------------------------- timing


class Meter:
    """Wall time, this process's CPU time (all threads) and other processes' CPU use over a block.

    The machine may be shared: ``foreign`` (cores busy with other processes, from /proc/stat) says how
    much a number was disturbed; ``cpu_ms`` per image is this process's own cost and is much less
    sensitive to that than a rate.
    """

    def __enter__(self):
        self.t, self.cpu, self.busy = time.perf_counter(), _own_cpu(), _busy_cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.own = _own_cpu() - self.cpu
        busy = _busy_cpu() - self.busy
        self.foreign = max(0.0, busy - self.own) / self.wall if busy >= 0 and self.wall > 0 else float("nan")

    def result(self, images: int) -> dict[str, float]:
        return {
            "images_per_s": images / self.wall,
            "cpu_ms_per_image": 1e3 * self.own / images,
            "foreign_cores": self.foreign,
        }


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _busy_cpu() -> float:
    """Seconds of non-idle CPU on the whole machine so far (Linux), or -1."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return -1.0
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


class Quiet:
    """Before a measurement, wait (within a total budget) until other processes leave the CPU alone."""

    def __init__(self, budget_s: float, threshold_cores: float = 0.2):
        self.budget, self.threshold, self.waited = budget_s, threshold_cores, 0.0

    def wait(self) -> None:
        while self.waited < self.budget:
            t, own, busy = time.perf_counter(), _own_cpu(), _busy_cpu()
            time.sleep(1.0)
            dt = time.perf_counter() - t
            if busy < 0 or (_busy_cpu() - busy - (_own_cpu() - own)) / dt < self.threshold:
                return
            self.waited += dt


def _forward(engine, batches) -> dict[str, float]:
    engine(batches[0])  # warm-up (trace / allocate)
    n = sum(int(b.shape[0]) for b in batches)
    with Meter() as m:
        for b in batches:
            engine(b)
    return m.result(n)


def _decode(source: str, limit: int, fm) -> dict[str, float]:
    """The input pipeline alone (read, decode, resize, batch, prefetch) on up to 512 images, no backbone."""
    from pipeline.data.images import make_image_dataset
    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    ds = load_dataset(DataConfig(source=source, limit=limit))
    data = make_image_dataset(ds, ds.samples[:512], fm.image_size, "stretch", BATCH, decode="dct")
    it = iter(data)  # kept alive past the timing (its teardown is not what we measure)
    with Meter() as m:
        n = sum(int(images.shape[0]) for _, images, _, _ in it)
    del it
    return m.result(n)


def _extract(
    source: str, limit: int, engine: str, threads: int, engines_cache: Path, decode: str = "dct"
) -> dict[str, Any]:
    from pipeline.stages.extract import extract

    with tempfile.TemporaryDirectory(prefix="bench-engines-", dir=OUT) as tmp:
        (Path(tmp) / "engines").symlink_to(engines_cache, target_is_directory=True)
        with Meter() as m:
            r = extract(
                data__source=source,
                data__limit=limit,
                data__decode=decode,
                backbone__name=BACKBONE,
                extract__cache_dir=tmp,
                extract__engine=engine,
                extract__threads=threads,
                extract__batch_size=BATCH,
                extract__progress=False,
                extract__lock_timeout=0,
            )
    out = m.result(r.extracted)
    return {
        "images_per_s": r.images_per_second,  # what extract reports: the decode→backbone→write loop
        "end_to_end_images_per_s": out["images_per_s"],  # the whole call: model build, digests, final write
        "cpu_ms_per_image": out["cpu_ms_per_image"],
        "foreign_cores": out["foreign_cores"],
        "used": r.engine,
    }


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _ratio(runs: list[dict], bare: list[float], key: str = "images_per_s") -> float:
    """Median over repetitions of this path's rate ÷ the bare rate of the same repetition."""
    return _median([r[key] / b for r, b in zip(runs, bare, strict=True)])


PATHS = [
    ("bare forward", "tensorflow"),
    ("bare forward", "tflite"),
    ("decode+resize only", "-"),
    ("featcache extract", "tensorflow"),
    ("featcache extract", "tflite"),
    ("featcache extract", "auto"),
]


def bench_dataset(
    label: str,
    source: str,
    limit: int,
    reps: int,
    fm,
    threads: int,
    engines_cache: Path,
    forward_batches: int,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    from pipeline.features.engines import TensorFlowEngine, load_or_convert

    lite, _ = load_or_convert(fm, threads, engines_cache.parent, verbose=False)
    tf_engine = TensorFlowEngine(fm)
    batches = _decoded_batches(source, limit, fm, forward_batches)
    runs: dict[tuple[str, str], list[dict]] = {p: [] for p in PATHS}
    for rep in range(reps):  # interleaved, so load changes hit every column alike
        for path in PATHS:
            kind, engine = path
            if quiet is not None:
                quiet.wait()
            if kind == "bare forward":
                r = _forward(tf_engine if engine == "tensorflow" else lite, batches)
            elif kind.startswith("decode"):
                r = _decode(source, limit, fm)
            else:
                r = _extract(source, limit, engine, threads, engines_cache)
            runs[path].append(r)
        print(
            f"  [{label} rep {rep + 1}/{reps}] "
            + " · ".join(
                f"{k.split(',')[0].replace('featcache ', '')} {e} {runs[(k, e)][-1]['images_per_s']:.0f}/s"
                for k, e in PATHS
            )
            + f" · foreign load {_median([r['foreign_cores'] for v in runs.values() for r in v[-1:]]):.2f} cores",
            file=sys.stderr,
            flush=True,
        )
    # Ratios are medians of per-repetition ratios: each divides by the bare pass measured moments before,
    # so a machine that slows down for a while shifts both sides alike.
    bare_tf = [r["images_per_s"] for r in runs[("bare forward", "tensorflow")]]
    rows = []
    for (kind, engine), rs in runs.items():
        rate = _median([r["images_per_s"] for r in rs])
        row = {
            "path": kind,
            "engine": engine if engine != "auto" else f"auto → {rs[-1]['used']}",
            "images_per_s": rate,
            "ratio": _ratio(rs, bare_tf),
            "cpu_ms_per_image": _median([r["cpu_ms_per_image"] for r in rs]),
            "foreign_cores": _median([r["foreign_cores"] for r in rs]),
        }
        if kind == "featcache extract":  # issue 5 item 1: ÷ the bare forward of the engine extract used
            bare = [r["images_per_s"] for r in runs[("bare forward", rs[-1]["used"])]]
            row["ratio_same_engine"] = _ratio(rs, bare)
        if "end_to_end_images_per_s" in rs[0]:
            e2e = _median([r["end_to_end_images_per_s"] for r in rs])
            e2e_ratio = _ratio(rs, bare_tf, "end_to_end_images_per_s")
            row.update(end_to_end_images_per_s=e2e, end_to_end_ratio=e2e_ratio)
        rows.append(row)
    return {
        "dataset": label,
        "source": source,
        "images": limit,
        "forward_images": sum(int(b.shape[0]) for b in batches),
        "repetitions": reps,
        "rows": rows,
        "raw": {f"{k} | {e}": v for (k, e), v in runs.items()},
    }


# ----------------------------------------------------------------------------------------------- large photos

LARGE = (4032, 3024)  # a 12 MP phone photo


def make_large_photos(root: Path, n: int, seed: int = 1) -> Path:
    """``n`` 12 MP JPEGs (q=90): upscaled random crops of sklearn's sample photos, one class folder each."""
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
        ch = int(rng.uniform(0.6, 1.0) * min(h, w * 3 / 4))
        cw = int(ch * 4 / 3)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        img.crop((left, top, left + cw, top + ch)).resize(LARGE, Image.Resampling.BICUBIC).save(
            d / f"{i:05d}.jpg", quality=90
        )
    (root / ".complete").write_text(str(n))
    return root


def bench_large_photos(fm, n: int, threads: int, engines_cache: Path) -> dict[str, Any]:
    """Where extraction's time goes on 12 MP photos: per-photo decode and resize CPU, and ``extract`` itself.

    Both decode policies: ``exact`` (full-size decode) and the default ``dct`` (libjpeg's DCT-domain
    downscaling, Pillow's ``draft``, to the smallest scale keeping both sides ≥ ``DCT_MARGIN`` × the input),
    and how far the ``dct`` pixels end up from a full decode after the shared resize.
    ``benchmarks/bench_decode.py`` has the full comparison (features, a linear probe, several sizes).
    """
    import tensorflow as tf

    from pipeline.data.decode import decode_image, decode_request
    from pipeline.data.preprocess import resize_images

    root = make_large_photos(OUT / f"photos-12mp-{n}", n)
    files = sorted(root.rglob("*.jpg"))
    size = fm.image_size
    resize = tf.function(
        lambda a: resize_images(a, size), input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)]
    )
    request = decode_request(size, "dct")
    timings: dict[str, list[float]] = {"decode": [], "resize": [], "draft_decode": [], "draft_resize": []}
    mean_diff, max_diff, draft_shape = [], [], None
    for f in files[:16]:
        raw = f.read_bytes()
        t0 = time.process_time()
        full = decode_image(raw)
        t1 = time.process_time()
        a = resize(full).numpy()
        t2 = time.process_time()
        small = decode_image(raw, reduce_to=request)
        t3 = time.process_time()
        b = resize(small).numpy()
        t4 = time.process_time()
        for k, v in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            timings[k].append(1000 * v)
        mean_diff.append(float(np.abs(a - b).mean()))
        max_diff.append(float(np.abs(a - b).max()))
        draft_shape = list(small.shape[:2])
    exact = _extract(str(root), n, "auto", threads, engines_cache, decode="exact")
    dct = _extract(str(root), n, "auto", threads, engines_cache, decode="dct")
    return {
        "images": n,
        "pixels": list(LARGE),
        "cpu_ms_per_photo": {k: _median(v[1:] or v) for k, v in timings.items()},  # first: warm-up
        "draft_shape": draft_shape,
        "draft_mean_abs_diff": _median(mean_diff),
        "draft_max_abs_diff": max(max_diff),
        "extract_auto_images_per_s": exact["images_per_s"],
        "extract_dct_images_per_s": dct["images_per_s"],
        "extract_engine": dct["used"],
    }


# ----------------------------------------------------------------------------------------------- precision


def bench_precision(fm, limit: int, threads: int, engines_cache: Path) -> dict[str, Any]:
    """Dynamic-range int8 TFLite (opt-in only): feature error, speed and downstream accuracy vs float32."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.data.images import make_image_dataset
    from pipeline.data.sources import load_dataset
    from pipeline.features.engines import load_or_convert, max_relative_diff
    from pipeline.utils.config import DataConfig

    f32, _ = load_or_convert(fm, threads, engines_cache.parent, verbose=False)
    i8, meta = load_or_convert(fm, threads, engines_cache.parent, quantize="dynamic-int8", verbose=False)
    ds = load_dataset(DataConfig(source="fashion_mnist", limit=limit))
    labels = np.array([ds.label_index()[s.label] for s in ds.samples])
    data = make_image_dataset(ds, ds.samples, fm.image_size, "stretch", BATCH, decode="dct")
    feats: dict[str, list] = {"float32": [], "int8": []}
    times = {"float32": 0.0, "int8": 0.0}
    layer = fm.layers[0]
    for _, images, _, _ in data:
        x = images.numpy()
        for name, eng in (("float32", f32), ("int8", i8)):
            t = time.perf_counter()
            feats[name].append(eng(x)[layer])
            times[name] += time.perf_counter() - t
    a, b = np.concatenate(feats["float32"]), np.concatenate(feats["int8"])
    n_train = int(0.8 * len(a))
    acc = {}
    for name, f in (("float32", a), ("int8", b)):
        scaler = StandardScaler().fit(f[:n_train])
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(f[:n_train]), labels[:n_train])
        acc[name] = float(clf.score(scaler.transform(f[n_train:]), labels[n_train:]))
    return {
        "option": "tflite dynamic-range int8 weights (opt-in; not selectable by engine=auto)",
        "images": len(a),
        "max_relative_diff_vs_float32": max_relative_diff(b, a),
        "mean_cosine_similarity": float(
            np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))
        ),
        "images_per_s": {k: len(a) / v for k, v in times.items()},
        "test_accuracy": acc,
        "test_images": len(a) - n_train,
        "model_bytes": meta.get("bytes"),
    }


# ----------------------------------------------------------------------------------------------- main


def run(out_dir: Path, quick: bool) -> dict:
    """Benchmark every engine on both datasets; returns (and ``__main__`` writes) the results."""
    import tensorflow as tf

    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import load_or_convert
    from pipeline.utils.config import BackboneConfig
    from pipeline.utils.workers import usable_cores

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    n = 256 if quick else 2000
    reps = 1 if quick else 5
    forward_batches = 4 if quick else 24  # 768 images: a bare pass long enough to average out noise
    quiet = Quiet(0 if quick else 60)  # a shared machine: give other people's jobs a moment to finish
    threads = usable_cores()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    t_start = time.perf_counter()
    photos = make_photos(OUT / f"photos-{n}", n)

    fm = build_feature_model(BackboneConfig(name=BACKBONE))
    engines_root = Path(tempfile.mkdtemp(prefix="bench-engine-cache-", dir=OUT))
    engines_cache = engines_root / "engines"
    engines_cache.mkdir()
    t = time.perf_counter()
    _, meta = load_or_convert(fm, threads, engines_root, verbose=False)
    conversion = {
        "seconds": time.perf_counter() - t,
        "probe_speedup": meta["speedup"],
        "max_relative_diff": meta["max_relative_diff"],
        "runtime": meta["runtime"],
        "xnnpack_delegate": meta["delegated"],
    }
    try:
        datasets = [
            bench_dataset(label, source, n, reps, fm, threads, engines_cache, forward_batches, quiet)
            for label, source in (
                ("natural JPEGs ~500×375", str(photos)),
                ("fashion_mnist (demo)", "fashion_mnist"),
            )
        ]
        precision = bench_precision(fm, 512 if quick else 2000, threads, engines_cache)
        large = bench_large_photos(fm, 16 if quick else 64, threads, engines_cache)
    finally:
        shutil.rmtree(engines_root, ignore_errors=True)
    result = {
        "benchmark": "engines",
        "backbone": BACKBONE,
        "image_size": fm.image_size,
        "batch_size": BATCH,
        "threads": threads,
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {"tensorflow": tf.__version__, "runtime": conversion["runtime"]},
        "conversion": conversion,
        "datasets": datasets,
        "precision": precision,
        "large_photos": large,
        "seconds": time.perf_counter() - t_start,
        "waited_for_quiet_s": quiet.waited,
    }
    (out_dir / "engines.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def markdown(result: dict) -> str:
    d0 = result["datasets"][0]
    lines = [
        f"Engines: {result['backbone']} at {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['threads']} threads, {'quick' if result['quick'] else 'full'} run, median of "
        f"{d0['repetitions']}; ratio = median over repetitions of ÷ the bare TensorFlow forward pass on the same dataset "
        f"({d0['forward_images']} decoded images in memory). `extract` images/s is what extract reports (its "
        "decode→backbone→write loop); end-to-end divides by the whole call (model build, digests, final HDF5).",
        "",
        "| dataset | path | engine | images/s | ratio | ÷ same engine bare | end-to-end images/s | ratio | CPU ms/image | other load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in result["datasets"]:
        for r in d["rows"]:
            e2e = r.get("end_to_end_images_per_s")
            e2e_cells = " | " if e2e is None else f"{e2e:.0f} | {r['end_to_end_ratio']:.2f}×"
            same = f"{r['ratio_same_engine']:.2f}" if "ratio_same_engine" in r else ""
            lines.append(
                f"| {d['dataset']} ({d['images']}) | {r['path']} | {r['engine']} | {r['images_per_s']:.0f} | "
                f"{r['ratio']:.2f}× | {same} | {e2e_cells} | {r['cpu_ms_per_image']:.1f} | {r['foreign_cores']:.2f} cores |"
            )
    c = result["conversion"]
    lines += [
        "",
        f"Conversion (once, then cached): {c['seconds']:.1f} s incl. validation; runtime {c['runtime']}; XNNPACK "
        f"delegate: {c['xnnpack_delegate']}; max relative feature difference vs TensorFlow on the probe photos: "
        + ", ".join(f"{k} {v:.1e}" for k, v in c["max_relative_diff"].items())
        + f"; probe speed-up {c['probe_speedup']:.2f}×.",
        "`other load`: CPU cores busy with other processes during the measurement (the machine may be shared; "
        f"this run waited {result.get('waited_for_quiet_s', 0):.0f} s in total for quiet moments).",
    ]
    p = result["precision"]
    lines += [
        "",
        f"Opt-in reduced precision, {p['option']}: max relative feature difference "
        f"{p['max_relative_diff_vs_float32']:.2g} (mean cosine {p['mean_cosine_similarity']:.4f}); "
        f"bare forward {p['images_per_s']['int8']:.0f} vs {p['images_per_s']['float32']:.0f} images/s (float32); "
        f"logistic-regression test accuracy on Fashion-MNIST features ({p['test_images']} test images): "
        f"{p['test_accuracy']['int8']:.3f} vs {p['test_accuracy']['float32']:.3f} (float32).",
    ]
    g = result.get("large_photos")
    if g:
        ms = g["cpu_ms_per_photo"]
        lines += [
            "",
            f"12 MP photos ({g['pixels'][0]}×{g['pixels'][1]} JPEG, {g['images']} files): `extract` (auto → "
            f"{g['extract_engine']}) with `data.decode=exact` {g['extract_auto_images_per_s']:.0f} images/s, "
            f"decode-bound: per photo {ms['decode']:.0f} ms of CPU to decode and {ms['resize']:.0f} ms to resize, "
            f"against ~5 ms for the backbone. With the default `data.decode=dct` (libjpeg's DCT downscaling to "
            f"{g['draft_shape'][1]}×{g['draft_shape'][0]}): {g.get('extract_dct_images_per_s', float('nan')):.0f} "
            f"images/s, {ms['draft_decode']:.0f} + {ms['draft_resize']:.1f} ms per photo, pixels after the shared "
            f"resize off by {g['draft_mean_abs_diff']:.2f} on average (max {g['draft_max_abs_diff']:.1f}) of 255 "
            "(the decode section has features and accuracy).",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- sweep


def sweep_one(name: str, size: int, cache_dir: str) -> dict[str, Any]:
    """Convert one backbone (random weights) and validate it; the record ``load_or_convert`` keeps."""
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.engines import EngineUnavailable, load_or_convert
    from pipeline.utils.config import BackboneConfig

    t = time.perf_counter()
    try:
        fm = build_feature_model(BackboneConfig(name=name, weights="none", image_size=size))
    except Exception as e:  # noqa: BLE001 - reported, not an engine problem
        last = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        return {"backbone": name, "ok": False, "stage": "build", "reason": f"{type(e).__name__}: {last[-1]}"}
    try:
        _, meta = load_or_convert(fm, 0, cache_dir, verbose=False)
    except EngineUnavailable as e:
        return {"backbone": name, "ok": False, "reason": str(e), "seconds": time.perf_counter() - t}
    return {
        "backbone": name,
        "ok": True,
        "max_relative_diff": max(meta["max_relative_diff"].values()),
        "speedup": meta["speedup"],
        "delegated": meta["delegated"],
        "convert_seconds": meta["convert_seconds"],
        "seconds": time.perf_counter() - t,
    }


def sweep(out_dir: Path, size: int = 96, names: list[str] | None = None) -> dict:
    """Every registered backbone through the TFLite engine (random weights, ``size`` px), one process each."""
    import subprocess

    from pipeline.features.backbones.registry import BACKBONES

    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="sweep-", dir=OUT) as cache:
        for name in names or list(BACKBONES):
            code = (
                "import json, sys; from benchmarks.bench_engines import sweep_one; "
                f"print('SWEEP ' + json.dumps(sweep_one({name!r}, {size}, {cache!r})))"
            )
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            root = Path(__file__).resolve().parents[1]
            try:
                p = subprocess.run(
                    [sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=root,
                    timeout=900,
                )
                lines = [x for x in p.stdout.splitlines() if x.startswith("SWEEP ")]
                rec = (
                    json.loads(lines[-1][6:])
                    if lines
                    else {"backbone": name, "ok": False, "reason": p.stderr[-300:]}
                )
            except subprocess.TimeoutExpired:
                rec = {"backbone": name, "ok": False, "reason": "timed out"}
            for sub in Path(cache, "engines").glob("*.tflite"):
                sub.unlink()  # keep the disk use to one model at a time
            results.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    path = out_dir / "engines-sweep.json"
    if names and path.is_file():  # a partial sweep updates the full one
        old = json.loads(path.read_text())
        if old.get("image_size") == size:
            new = {r["backbone"]: r for r in results}
            results = [new.pop(r["backbone"], r) for r in old["backbones"]] + list(new.values())
    result = {"image_size": size, "weights": "none", "backbones": results}
    path.write_text(json.dumps(result, indent=1))
    return result


def sweep_markdown(result: dict) -> str:
    lines = [
        f"TFLite engine on every backbone (random weights, {result['image_size']} px, probe photos): "
        "max relative feature difference vs TensorFlow, and speed-up on the probe batch",
        "",
        "| backbone | converts | max relative diff | speed-up | note |",
        "|---|---|---:|---:|---|",
    ]
    for r in result["backbones"]:
        if r["ok"]:
            lines.append(f"| {r['backbone']} | yes | {r['max_relative_diff']:.1e} | {r['speedup']:.2f}× | |")
        else:
            reason = ([x.strip() for x in r["reason"].splitlines() if x.strip()] or ["?"])[-1]
            verdict = "model does not build" if r.get("stage") == "build" else "no (auto → tensorflow)"
            lines.append(f"| {r['backbone']} | {verdict} | | | {reason[:160].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 images, 1 repetition")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--sweep", nargs="*", metavar="BACKBONE", help="convert + validate every (or these) backbone(s)"
    )
    args = ap.parse_args(argv)
    if args.sweep is not None:
        print(sweep_markdown(sweep(args.out, names=args.sweep or None)))
        return 0
    result = run(args.out, args.quick)
    print(markdown(result))
    print(f"\n(written to {args.out / 'engines.json'} in {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
