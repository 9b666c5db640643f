"""Issue 16: a 100-trial random search over five head families with ranges vs one extraction of the images.

One run: extract the images into a fresh cache (timed), then ``featcache search --space FILE --strategy
random --n-trials 100 --n-jobs 2`` as a user would run it (a subprocess, timed); the ratio of the two is
the figure. The space holds the corner that used to take minutes per trial (linear SVM on standardized
features).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SPACE = """
transforms = [["standardize"]]
[[heads]]
name = "logistic"
params = { C = { loguniform = [0.0001, 100.0] } }
[[heads]]
name = "linear_svm"
transforms = [["standardize"], ["l2"]]
params = { C = { loguniform = [0.0001, 100.0] } }
[[heads]]
name = "ridge"
params = { alpha = { loguniform = [0.01, 100000.0] } }
[[heads]]
name = "knn"
transforms = [["l2"], ["standardize"]]
params = { n_neighbors = { randint = [1, 50] }, weights = ["uniform", "distance"] }
[[heads]]
name = "mlp"
params = { hidden = [[64], [128], [256]], alpha = { loguniform = [0.00001, 1.0] } }
"""


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    from pipeline.stages.extract import extract
    from pipeline.utils.config import load_config

    work = out_dir / "work" / "search16"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    limit, size, n_trials = (600, 96, 30) if quick else (4000, 224, 100)
    cfg = load_config(
        None,
        {
            "data.source": "fashion_mnist",
            "data.limit": limit,
            "backbone.image_size": size,
            "extract.cache_dir": str(work / "cache"),
            "extract.progress": False,
        },
    )
    t0 = time.perf_counter()
    r = extract(cfg)
    t_extract = time.perf_counter() - t0
    space = work / "space.toml"
    space.write_text(SPACE)
    args = ["search", "--cache", str(r.path), "--space", str(space), "--strategy", "random"]
    args += [
        "--n-trials",
        str(n_trials),
        "--n-jobs",
        "2",
        "--set",
        f"train.runs_dir={work / 'runs'}",
        "--no-refit",  # the trials alone, as RESULTS.md has always measured them
        "--quiet",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    t_search = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"search failed: {proc.stderr[-2000:]}")
    summary = json.loads(next((work / "runs").glob("search-*/search.json")).read_text())
    board = json.loads(next((work / "runs").glob("search-*/leaderboard.json")).read_text())
    status = {s: sum(1 for b in board if b["status"] == s) for s in ("ok", "cut", "pruned", "failed")}
    slowest = sorted(board, key=lambda b: -(b.get("seconds") or 0))[:3]
    return {
        "images": limit,
        "image_size": size,
        "engine": r.engine,
        "n_trials": n_trials,
        "extract_s": round(t_extract, 1),
        "search_s": round(t_search, 1),
        "ratio": round(t_search / t_extract, 2),
        "trials_per_s": round(len(board) / t_search, 2),
        "best_val_acc": round(summary["best"]["score"], 4),
        "best": f"{summary['best']['head']} {summary['best']['params']} [{summary['best']['transforms']}]",
        "status": status,
        "warnings": sum(1 for b in board if b.get("warning")),
        "slowest": [
            f"{b['head']} {b['params']} [{b['transforms']}] {b['seconds']:.1f} s {b['status']}"
            for b in slowest
        ],
        "goal": "100-trial random search <= 1.0x one extraction of the same images",
        "met": t_search <= t_extract,
    }


def markdown(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"Fashion-MNIST, {r['images']} images at {r['image_size']} px, fresh cache ({r['engine']}); "
            f"`featcache search --space FILE --strategy random --n-trials {r['n_trials']} --n-jobs 2` over "
            "logistic, linear SVM (standardized and l2), ridge, kNN and MLP with ranges (benchmarks/bench_search.py).",
            "",
            "| extraction | search | ratio | trials/s | best val acc | ok / cut / pruned / failed | convergence warnings | goal met |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['extract_s']} s | {r['search_s']} s | {r['ratio']} | {r['trials_per_s']} | {r['best_val_acc']} | "
            f"{r['status']['ok']} / {r['status']['cut']} / {r['status']['pruned']} / {r['status']['failed']} | "
            f"{r['warnings']} | {'yes' if r['met'] else 'no'} |",
            "",
            f"Best: {r['best']}. Slowest trials: {'; '.join(r['slowest'])}.",
        ]
    )


if __name__ == "__main__":  # pragma: no cover
    res = run(REPO / "benchmarks" / "out", quick="--quick" in sys.argv)
    print(markdown(res))
    (REPO / "benchmarks" / "out" / "search16.json").parent.mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "search16.json").write_text(json.dumps(res, indent=2))
