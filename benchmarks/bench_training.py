"""Why cache: the cached way vs the notebook way, a head search vs one backbone pass, streaming memory.

Item 2 trains the *same* head (Dense softmax, Adam 1e-3, batch 32, 10 epochs, no early stopping) twice on
the same Fashion-MNIST rows: (a) featcache — one extraction, then the head on the cached features;
(b) the classic notebook model — frozen backbone + the head, trained end to end on images for 10 epochs.
Item 3 runs the built-in 24-configuration search on the cache and compares it with one extraction pass.
Item 4 trains a streaming head on a feature file several times larger than the memory budget.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peak_rss import peak_rss

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 10


def _cfg(cache_dir: Path, limit: int, size: int, engine: str, **extra):
    from pipeline.utils.config import load_config

    return load_config(
        None,
        {
            "data.source": "fashion_mnist",
            "data.limit": limit,
            "backbone.image_size": size,
            "extract.cache_dir": str(cache_dir),
            "extract.engine": engine,
            "extract.progress": False,
            **extra,
        },
    )


def _notebook_way(cache_path: Path, size: int) -> tuple[float, float]:
    """Frozen backbone + Dense head, fit end to end on the images for EPOCHS epochs (timed), test accuracy."""
    import keras
    import tensorflow as tf

    from pipeline.cache.store import FeatureCache
    from pipeline.data.images import to_rgb
    from pipeline.data.preprocess import resize_images
    from pipeline.data.sources import load_dataset
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.utils.config import SPLITS, BackboneConfig, DataConfig

    with FeatureCache(cache_path) as c:
        data_cfg = c.meta["config"]["data"]
        keys, labels, split, n_classes = c.keys, c.labels, c.split, len(c.class_names)
    ds = load_dataset(DataConfig(**data_cfg))
    index = {s.key: s.index for s in ds.samples}
    rows = {name: np.flatnonzero(split == code) for code, name in enumerate(SPLITS)}

    def images(r):
        x = np.stack([to_rgb(ds.arrays[index[keys[i]]]) for i in r])
        return tf.data.Dataset.from_tensor_slices((x, labels[r])).map(
            lambda im, y: (resize_images(im, size), y)
        )

    fm = build_feature_model(BackboneConfig(image_size=size))
    fm.base.trainable = False
    inp = keras.Input((size, size, 3))
    feats = fm.model(inp)[fm.layers[0]]
    out = keras.layers.Dense(n_classes, activation="softmax")(feats)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    train = images(rows["train"]).shuffle(4096, seed=0).batch(32).prefetch(2)
    val = images(rows["val"]).batch(32).prefetch(2)
    t0 = time.perf_counter()
    model.fit(train, validation_data=val, epochs=EPOCHS, verbose=0)
    seconds = time.perf_counter() - t0
    _, acc = model.evaluate(images(rows["test"]).batch(64), verbose=0)
    return seconds, float(acc)


def bench_cached(work: Path, limit: int, size: int, engine: str) -> dict[str, Any]:
    """(a) featcache: one extraction into a fresh cache dir (a first TFLite conversion included), then the head."""
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    cache_dir = work / f"train_cache_{engine}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = _cfg(cache_dir, limit, size, engine)
    t0 = time.perf_counter()
    r = extract(cfg)
    t_extract = time.perf_counter() - t0
    cfg.train.head = "keras_linear"
    cfg.train.params = {"epochs": EPOCHS, "patience": 0, "batch_size": 32, "learning_rate": 1e-3}
    cfg.train.transforms = []
    t0 = time.perf_counter()
    run = train(cfg)
    t_train = time.perf_counter() - t0
    return {
        "engine": r.engine or engine,
        "extract_s": round(t_extract, 1),
        "train_s": round(t_train, 1),
        "total_s": round(t_extract + t_train, 1),
        "test_acc": round(run.test_accuracy, 4),
        "cache_path": str(r.path),
    }


def bench_cached_vs_notebook(
    work: Path, limit: int, size: int, engines=("tensorflow", "auto")
) -> dict[str, Any]:
    """Item 2: the cached way with each engine, and the notebook way once (it does not depend on the engine)."""
    cached = {e: bench_cached(work, limit, size, e) for e in engines}
    t_nb, acc_nb = _notebook_way(Path(cached[engines[0]]["cache_path"]), size)
    rows = {}
    for e, c in cached.items():
        speedup = t_nb / c["total_s"]
        delta = 100 * (c["test_acc"] - acc_nb)
        rows[e] = {
            **c,
            "speedup": round(speedup, 2),
            "acc_delta_points": round(delta, 2),
            "met": speedup >= 10 and abs(delta) <= 1.0,
        }
    return {
        "images": limit,
        "image_size": size,
        "epochs": EPOCHS,
        "notebook": {"total_s": round(t_nb, 1), "test_acc": round(acc_nb, 4)},
        "cached": rows,
        "goal": ">= 10x faster, accuracy within 1 point",
    }


def bench_search(cache_path: Path, passes: dict[str, float], n_jobs: int) -> dict[str, Any]:
    """Item 3: the built-in 24-configuration search on the cache vs one extraction pass with each engine."""
    from pipeline.stages.search import search
    from pipeline.utils.config import load_config

    # the trials alone (no refit run at the end), as RESULTS.md has always measured them
    cfg = load_config(None, {"train.cache": str(cache_path), "search.n_jobs": n_jobs, "search.refit": False})
    t0 = time.perf_counter()
    s = search(cfg, fresh=True)
    secs = time.perf_counter() - t0
    return {
        "configs": len(s.leaderboard),
        "n_jobs": n_jobs,
        "search_s": round(secs, 1),
        "one_extraction_s": passes,
        "ratio": {e: round(secs / p, 2) for e, p in passes.items()},
        "best": s.best.get("head") if isinstance(s.best, dict) else str(s.best),
        "goal": "search faster than one extraction pass",
        "met": {e: secs < p for e, p in passes.items()},
    }


def _big_cache(small: Path, out: Path, rows: int) -> Path:
    """A real featcache file of ``rows`` rows, written by the store's own writer from tiled real features."""
    from pipeline.cache.store import FeatureCache
    from pipeline.cache.write import PartWriter, Row, scan_parts, write_cache

    with FeatureCache(small) as c:
        feats, labels, layer = c.features(), c.labels, c.default_layer()
        meta = {
            k: c.meta[k]
            for k in ("fingerprint", "feature_key", "backbone", "layers", "pooling", "image_size", "resize")
        }
        class_names = c.class_names
    final = out / f"big-{rows}.h5"
    if final.exists():
        return final
    writer = PartWriter(
        final, {"fingerprint": meta["fingerprint"], "backbone": meta["backbone"], "dataset": "big"}
    )
    rng = np.random.default_rng(0)
    all_rows = []
    for start in range(0, rows, 4096):
        idx = rng.integers(0, len(feats), min(4096, rows - start))
        block = feats[idx] + rng.normal(0, 0.01, (len(idx), feats.shape[1])).astype(np.float32)
        ids = [f"{start + j:032x}" for j in range(len(idx))]
        writer.write(ids, {layer: block})
        all_rows += [
            Row(f"r{start + j}", ids[j], int(labels[i]), [0, 0, 0, 1, 2][j % 5], -1, -1)
            for j, i in enumerate(idx)
        ]
    write_cache(
        final,
        all_rows,
        class_names,
        {layer: feats.shape[1]},
        {**meta, "dataset": "big"},
        None,
        scan_parts(final, meta["fingerprint"]),
    )
    shutil.rmtree(final.with_name(final.stem + ".partial"), ignore_errors=True)
    return final


def bench_streaming(work: Path, small_cache: Path, rows: list[int], budget_mb: int) -> dict[str, Any]:
    out = {"budget_mib": budget_mb, "runs": []}
    for n in rows:
        big = _big_cache(small_cache, work, n)
        args = [
            "train",
            "--cache",
            str(big),
            "--head",
            "logistic",
            "--set",
            f"train.runs_dir={work / 'big_runs'}",
        ]
        t0 = time.perf_counter()
        rss, stdout, _ = peak_rss(args, env={"FEATCACHE_MEMORY_BUDGET": str(budget_mb << 20)}, cwd=REPO)
        out["runs"].append(
            {
                "rows": n,
                "file_mib": round(big.stat().st_size / 2**20, 1),
                "peak_rss_mib": round(rss, 1),
                "seconds": round(time.perf_counter() - t0, 1),
                "streamed": "stream" in stdout.lower(),
            }
        )
    first, last = out["runs"][0], out["runs"][-1]
    out["rss_growth"] = round(last["peak_rss_mib"] / first["peak_rss_mib"] - 1, 3)
    out["goal"] = "RSS bounded (does not grow with the file, stays below the file size)"
    out["met"] = out["rss_growth"] <= 0.10 and last["peak_rss_mib"] < last["file_mib"]
    return out


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    limit, size = (600, 96) if quick else (4000, 224)
    result: dict[str, Any] = {"cached_vs_notebook": bench_cached_vs_notebook(work, limit, size)}
    cached = result["cached_vs_notebook"]["cached"]
    ref = cached["tensorflow"]
    passes = {e: c["extract_s"] for e, c in cached.items()}
    result["search"] = bench_search(Path(ref["cache_path"]), passes, n_jobs=2)
    result["streaming"] = bench_streaming(
        work, Path(ref["cache_path"]), [20_000, 40_000] if quick else [60_000, 120_000], 64
    )
    (out_dir / "training.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def markdown(r: dict[str, Any]) -> str:
    cv = r["cached_vs_notebook"]
    nb = cv["notebook"]
    lines = [
        f"Fashion-MNIST, {cv['images']} images at {cv['image_size']} px; the same Dense softmax head, Adam 1e-3, "
        f"batch 32, {cv['epochs']} epochs both ways. Cached = extraction into a fresh cache dir (any first TFLite "
        "conversion included) + `train`; notebook = frozen backbone + head, `fit` on the images.",
        "",
        f"| engine | cached: extract + train | notebook: {cv['epochs']} epochs on images | speed-up | test acc cached / notebook | goal met |",
        "|---|---|---|---|---|---|",
    ]
    for engine, c in cv["cached"].items():
        lines.append(
            f"| {engine} → {c['engine']} | {c['extract_s']} + {c['train_s']} = {c['total_s']} s | {nb['total_s']} s | "
            f"{c['speedup']}× | {c['test_acc']:.3f} / {nb['test_acc']:.3f} ({c['acc_delta_points']:+.1f} pt) | "
            f"{'yes' if c['met'] else 'no'} |"
        )
    s = r["search"]
    lines += [
        "",
        "| search | configs | time | one extraction pass | ratio | goal met |",
        "|---|---|---|---|---|---|",
    ]
    for e, p in s["one_extraction_s"].items():
        lines.append(
            f"| grid, n_jobs={s['n_jobs']} | {s['configs']} | {s['search_s']} s | {p} s ({e}) | {s['ratio'][e]} | "
            f"{'yes' if s['met'][e] else 'no'} |"
        )
    lines += [
        "",
        f"| streaming train (logistic, budget {r['streaming']['budget_mib']} MiB) | file | peak RSS | time |",
        "|---|---|---|---|",
    ]
    for run_ in r["streaming"]["runs"]:
        lines.append(
            f"| {run_['rows']} rows | {run_['file_mib']} MiB | {run_['peak_rss_mib']} MiB | {run_['seconds']} s |"
        )
    lines.append(
        f"\nRSS growth from the smaller to the larger file: {r['streaming']['rss_growth'] * 100:+.1f} % "
        f"({'bounded' if r['streaming']['met'] else 'NOT bounded'})."
    )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    res = run(REPO / "benchmarks" / "out", quick="--quick" in sys.argv)
    print(markdown(res))
