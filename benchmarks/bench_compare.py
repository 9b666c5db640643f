"""Issue 29: ``featcache compare``: what a comparison costs on top of its extractions, and a leaderboard.

    python -m benchmarks --only compare            # ~8 minutes on 2 cores (3 repetitions at 224 px)
    python -m benchmarks --only compare --quick    # a smoke run of the numbers

* **Overhead.** Three candidates (EfficientNet-Lite0 avg and max pooling, MobileNetV3-Small with random
  weights) on Fashion-MNIST: ``compare()`` against the sum of the three plain ``extract()`` calls with the
  same settings, each arm in fresh caches, interleaved repetition by repetition (the machine may be shared;
  an untimed warm-up of each arm first);
  the ratio per repetition is the figure (goal: ≤ 1.10). A third arm runs ``compare()`` with the probes'
  models *not* kept for the extractions (``KEEP_MODEL_BYTES = 0``: each model built twice, as before), so
  the difference is the time saved by building each model once. The overhead is split into the probe's
  scoring (``score_layer`` timed again on the same caches) and the rest (the check, bookkeeping).
* **Leaderboard.** Fashion-MNIST, four rows from three candidates (Lite0 at two layers from one pass, Lite0
  max pooling, MobileNetV3-Small random), ``--shots 1,5,10 --seeds 3``, as ``featcache compare`` prints it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

OVERHEAD = [
    {"name": "efficientnet_lite0"},
    {"label": "lite0-max", "name": "efficientnet_lite0", "pooling": "max"},
    {"name": "mobilenet_v3_small", "weights": "none"},
]
BOARD = [
    {"label": "lite0:block5c+top", "name": "efficientnet_lite0", "layers": ["block5c_add", "top_activation"]},
    {"label": "lite0-max", "name": "efficientnet_lite0", "pooling": "max"},
    {"label": "mnv3-small-random", "name": "mobilenet_v3_small", "weights": "none"},
]


def _toml(cands: list[dict[str, Any]]) -> str:
    return "\n".join(
        "[[candidate]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in c.items()) for c in cands
    )


def _base(work: Path, limit: int, size: int) -> dict[str, Any]:
    return {
        "data": "fashion_mnist",
        "limit": limit,
        "image_size": size,
        "cache_dir": str(work),
        "extract__progress": False,
    }


def _plain(work: Path, limit: int, size: int) -> float:
    """The three candidates' plain extractions, one after the other: their wall seconds."""
    from pipeline.stages.extract import extract

    t0 = time.perf_counter()
    for c in OVERHEAD:
        keys = {f"backbone__{k}": v for k, v in c.items() if k != "label"}
        extract(**_base(work, limit, size), **keys)
    return time.perf_counter() - t0


def _compare(work: Path, limit: int, size: int, keep: bool, shots=(), seeds: int = 3):
    import pipeline
    from pipeline.stages import compare as stage

    work.mkdir(parents=True, exist_ok=True)
    (work / "candidates.toml").write_text(_toml(OVERHEAD if not shots else BOARD))
    saved, stage.KEEP_MODEL_BYTES = stage.KEEP_MODEL_BYTES, (stage.KEEP_MODEL_BYTES if keep else 0)
    try:
        t0 = time.perf_counter()
        result = pipeline.compare(
            **_base(work, limit, size),
            candidates=str(work / "candidates.toml"),
            shots=list(shots),
            seeds=seeds,
        )
        return time.perf_counter() - t0, result
    finally:
        stage.KEEP_MODEL_BYTES = saved


def _scoring_seconds(rows: list[dict[str, Any]]) -> float:
    """The probe protocol alone, again, on the caches ``rows`` name (each cache once)."""
    from pipeline.cache.store import FeatureCache
    from pipeline.tuning.probe import score_layer

    t0 = time.perf_counter()
    for path in dict.fromkeys(r["cache"] for r in rows):
        with FeatureCache(path) as cache:
            for layer in cache.layers:
                score_layer(cache, layer, [], 3)
    return time.perf_counter() - t0


def overhead(root: Path, limit: int, size: int, reps: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"plain": [], "compare": [], "compare_built_twice": [], "scoring": []}
    extract_in_compare = []
    _plain(root / "warm", 100, size)  # untimed: TensorFlow, the weights files, sklearn loaded once
    _compare(root / "warm-compare", 100, size, keep=True)
    for rep in range(reps):
        arms = ["plain", "compare", "compare_built_twice"]
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            work = root / f"{arm}-{rep}"
            shutil.rmtree(work, ignore_errors=True)
            if arm == "plain":
                runs[arm].append(_plain(work, limit, size))
                continue
            seconds, result = _compare(work, limit, size, keep=arm == "compare")
            runs[arm].append(seconds)
            if arm == "compare":
                extract_in_compare.append(
                    sum({r["cache"]: r["extract_seconds"] for r in result.rows}.values())
                )
                runs["scoring"].append(_scoring_seconds(result.rows))
                images = result.extracted
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root / f"plain-{rep}", ignore_errors=True)
    ratios = [c / p for c, p in zip(runs["compare"], runs["plain"], strict=True)]
    saved = [
        (b - c) / len(OVERHEAD) for b, c in zip(runs["compare_built_twice"], runs["compare"], strict=True)
    ]
    med = statistics.median
    return {
        "images": images,
        "image_size": size,
        "candidates": [c.get("label") or c["name"] for c in OVERHEAD],
        "reps": reps,
        "runs": runs,
        "ratios": ratios,
        "ratio": med(ratios),
        "plain_s": med(runs["plain"]),
        "compare_s": med(runs["compare"]),
        "extract_in_compare_s": med(extract_in_compare),
        "scoring_s": med(runs["scoring"]),
        "saved_per_candidate_s": med(saved),
        "saved_runs": saved,
        "met": med(ratios) <= 1.10,
    }


def board(root: Path, limit: int, size: int, shots: list[int]) -> dict[str, Any]:
    from pipeline.stages.compare import format_leaderboard

    work = root / "board"
    shutil.rmtree(work, ignore_errors=True)
    seconds, result = _compare(work, limit, size, keep=True, shots=shots, seeds=3)
    rows = result.rows
    shutil.rmtree(work, ignore_errors=True)
    return {
        "images": result.extracted,
        "image_size": size,
        "seconds": seconds,
        "rows": rows,
        "text": format_leaderboard(rows),
    }


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    root = out_dir / "work" / "compare29"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if quick:
        out = {"overhead": overhead(root, 300, 48, 1), "board": board(root, 300, 48, [1, 5])}
    else:
        out = {"overhead": overhead(root, 500, 224, 3), "board": board(root, 3000, 64, [1, 5, 10])}
    shutil.rmtree(root, ignore_errors=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    o, b = r["overhead"], r["board"]
    per = " / ".join(f"{x:.3f}" for x in o["ratios"])
    saved = " / ".join(f"{x:.2f}" for x in o["saved_runs"])
    other = o["compare_s"] - o["extract_in_compare_s"] - o["scoring_s"]
    lines = [
        f"Overhead: Fashion-MNIST, {o['images'] // len(o['candidates'])} images at {o['image_size']} px, "
        f"candidates {', '.join(o['candidates'])}; `compare()` vs the sum of their plain `extract()` calls, "
        f"fresh caches, interleaved, {o['reps']} repetitions (medians; benchmarks/bench_compare.py).",
        "",
        "| 3 plain extracts | compare | ratio (per rep) | extraction in compare | scoring (probes) | check + bookkeeping | model built twice: compare | saved per candidate (per rep) | goal ≤ 1.10 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {o['plain_s']:.1f} s | {o['compare_s']:.1f} s | {o['ratio']:.3f} ({per}) | "
        f"{o['extract_in_compare_s']:.1f} s | {o['scoring_s']:.1f} s | {other:.1f} s | "
        f"{statistics.median(o['runs']['compare_built_twice']):.1f} s | {o['saved_per_candidate_s']:.2f} s ({saved}) | "
        f"{'yes' if o['met'] else 'no'} |",
        "",
        f"Leaderboard: Fashion-MNIST, {b['images'] // 3} images at {b['image_size']} px, "
        f"`--shots {','.join(sorted(b['rows'][0]['shots'], key=int))} --seeds 3`, {b['seconds']:.0f} s in all "
        "(extraction and probes); k-shot columns are the test accuracy's mean ± std over the seeds:",
        "",
        "```",
        b["text"],
        "```",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    res = run(REPO / "benchmarks" / "out", quick="--quick" in sys.argv)
    print(markdown(res))
    (REPO / "benchmarks" / "out" / "compare29.json").write_text(json.dumps(res, indent=2, default=str))
