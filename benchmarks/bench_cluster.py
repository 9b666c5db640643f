"""Extraction on a Dask cluster vs one process, on the same photos in the same run (issue 13).

One process: ``extract`` as today (TensorFlow's pools sized to every core). Cluster: ``--cluster local:2``'s
layout — a LocalCluster of single-threaded worker processes, one per core — reached by address, so its
workers are warm (their model built by a first small job, as on a long-lived cluster); the two runs are
interleaved, ``reps`` each, and the ratio is of medians. A cold ``local:N`` run (the cluster started, the
model built in every worker, inside the timed call) is reported as well, end to end, and so are the two
``featcache extract`` commands (with and without ``--cluster local:N``) timed whole, cold against cold.
Scaling: warm local clusters of 1, 2, 4, … single-threaded workers up to the cores, each on the same job;
parallel efficiency at N = rate(N) ÷ (N × rate(1)) (issue 13's goal: ≥ 0.8 at 8 workers, on a machine
with the cores).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_engines import BACKBONE, OUT, make_photos
from pipeline.utils.cluster import start_local_cluster

BATCH = 32
ENGINE = "tflite"  # what ``auto`` picks for a job of 500 images or more


def _fresh_cache_dir() -> Path:
    """The benchmark's cache folder without caches: the engine's converted model is kept from run to run (as
    in a user's ``cache/engines``), so no run times a TFLite conversion."""
    cache_dir = OUT / "cluster-cache"
    for old in [*cache_dir.glob("*.h5"), *cache_dir.glob("*.partial")]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return cache_dir


def _extract(source: str, limit: int, cluster: str) -> dict[str, Any]:
    """One fresh cache of ``limit`` images, by the API in this process."""
    from pipeline.stages.extract import extract

    cache_dir = _fresh_cache_dir()
    t0 = time.perf_counter()
    r = extract(
        data__source=source,
        data__limit=limit,
        backbone__name=BACKBONE,
        extract__cache_dir=str(cache_dir),
        extract__engine=ENGINE,
        extract__batch_size=BATCH,
        extract__progress=False,
        extract__lock_timeout=0,
        cluster__address=cluster,
    )
    wall = time.perf_counter() - t0
    return {
        "images_per_s": r.images_per_second,  # what extract reports: the shards / batches loop
        "end_to_end_images_per_s": r.extracted / wall,  # the whole call (a cold cluster's start included)
        "images": r.extracted,
        "engine": r.engine,
    }


def _cli(source: str, limit: int, cluster: str) -> dict[str, Any]:
    """``featcache extract`` as a user runs it: a fresh process that imports TensorFlow and builds its model
    (one process) or starts a local cluster whose workers do (``--cluster``); wall time of the whole command."""
    cache_dir = _fresh_cache_dir()
    cmd = [sys.executable, "-m", "pipeline", "extract", "--quiet", "--data", source, "--limit", str(limit)]
    cmd += ["--cache-dir", str(cache_dir), "--batch-size", str(BATCH), "--set", f"extract.engine={ENGINE}"]
    cmd += ["--cluster", cluster] if cluster else []
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"images_per_s": limit / (time.perf_counter() - t0)}


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, … up to ``cores``, and ``cores`` itself."""
    return sorted({2**k for k in range(cores.bit_length()) if 2**k <= cores} | {cores})


def _scaling(distributed, photos: str, n: int, reps: int, cores: int) -> list[dict]:
    """The batch loop's rate on warm clusters of each size in :func:`worker_counts` (median of ``reps``)."""
    rows = []
    for w in worker_counts(cores):
        with start_local_cluster(distributed, w) as lc:
            _extract(photos, 2 * BATCH * w, lc.scheduler_address)  # warm-up: every worker builds its model
            runs = [_extract(photos, n, lc.scheduler_address)["images_per_s"] for _ in range(reps)]
        rows.append({"workers": w, "images_per_s": statistics.median(runs), "runs": runs})
    for row in rows:
        row["efficiency"] = row["images_per_s"] / (row["workers"] * rows[0]["images_per_s"])
    return rows


def run(out_dir: Path, quick: bool) -> dict:
    import distributed

    # a job of 1,024 photos: 32 batches, planned as 10 shards on 2 workers (8 batches down to 1); with 256
    # photos each shard is 1–2 batches and a shard's fixed costs are a visible share
    n = 96 if quick else 1024
    reps = 1 if quick else 3
    workers = os.cpu_count() or 1
    OUT.mkdir(parents=True, exist_ok=True)
    photos = str(make_photos(OUT / f"photos-{n}", n))
    single: list[dict] = []
    warm: list[dict] = []
    with start_local_cluster(distributed, workers) as lc:
        _extract(photos, 2 * BATCH * workers, lc.scheduler_address)  # warm-up: every worker builds its model
        _extract(photos, 2 * BATCH, "")  # and this process imports TensorFlow
        for _ in range(reps):
            single.append(_extract(photos, n, ""))
            warm.append(_extract(photos, n, lc.scheduler_address))
    cold = _extract(photos, n, f"local:{workers}")
    cli_single, cli_cluster = [], []
    for _ in range(reps):  # cold against cold: each command pays its own start-up, as a user's does
        cli_single.append(_cli(photos, n, ""))
        cli_cluster.append(_cli(photos, n, f"local:{workers}"))
    # every worker of the largest cluster gets at least 4 batches
    m = n if quick else max(n, 4 * BATCH * workers)
    scaling = _scaling(distributed, str(make_photos(OUT / f"photos-{m}", m)), m, reps, workers)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    return {
        "images": n,
        "workers": workers,
        "reps": reps,
        "engine": ENGINE,
        "single": single,
        "cluster_warm": warm,
        "cluster_cold": cold,
        "ratio": med(warm, "images_per_s") / med(single, "images_per_s"),
        "ratio_end_to_end": med(warm, "end_to_end_images_per_s") / med(single, "end_to_end_images_per_s"),
        "ratio_cold_end_to_end": cold["end_to_end_images_per_s"] / med(single, "end_to_end_images_per_s"),
        "cli_single": cli_single,
        "cli_cluster": cli_cluster,
        "ratio_cli": med(cli_cluster, "images_per_s") / med(cli_single, "images_per_s"),
        "scaling_images": m,
        "scaling": scaling,
    }


def markdown(result: dict) -> str:
    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    s, w, c = result["single"], result["cluster_warm"], result["cluster_cold"]
    rows = [
        "| run | images/s (extract) | ratio | end-to-end images/s | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| one process ({result['engine']}, all cores) | {med(s, 'images_per_s'):.1f} | 1.00× | "
        f"{med(s, 'end_to_end_images_per_s'):.1f} | 1.00× |",
        f"| cluster, {result['workers']} warm single-threaded workers | {med(w, 'images_per_s'):.1f} | "
        f"{result['ratio']:.2f}× | {med(w, 'end_to_end_images_per_s'):.1f} | {result['ratio_end_to_end']:.2f}× |",
        f"| `--cluster local:{result['workers']}`, cold (cluster start + model build timed) | "
        f"{c['images_per_s']:.1f} |  | {c['end_to_end_images_per_s']:.1f} | {result['ratio_cold_end_to_end']:.2f}× |",
        f"| `featcache extract` command, one process (its own start-up) | | | "
        f"{med(result['cli_single'], 'images_per_s'):.1f} | 1.00× |",
        f"| `featcache extract --cluster local:{result['workers']}` command (its own start-up) | | | "
        f"{med(result['cli_cluster'], 'images_per_s'):.1f} | {result['ratio_cli']:.2f}× |",
    ]
    return (
        f"{result['images']} natural JPEGs (~500×375) → {BACKBONE} at 224 px, batch {BATCH}, engine "
        f"{result['engine']}; median of {result['reps']}, one process and the warm cluster interleaved; "
        "ratio = ÷ one process in the same run. Goal (issue 13): the cluster ≥ 0.9× one process.\n\n"
        + "\n".join(rows)
        + "\n\n`images/s (extract)` is the batch loop only; end to end is the whole `extract` call, where one "
        "process loads its model every time and warm workers keep theirs. The cold run pays for starting the "
        "worker processes and building the model in each (a fixed cost of some seconds, small on a large job), "
        "against a one-process call that runs where TensorFlow is already imported. The two commands compare "
        "cold with cold: each is a fresh `featcache extract` process, as a user runs it (median of "
        f"{result['reps']}, interleaved)." + _scaling_markdown(result)
    )


def _scaling_markdown(result: dict) -> str:
    if "scaling" not in result:  # results of a run before the scaling part
        return ""
    rows = [
        f"| {r['workers']} | {r['images_per_s']:.1f} | {r['efficiency']:.2f} | "
        + " / ".join(f"{x:.1f}" for x in r["runs"])
        + " |"
        for r in result["scaling"]
    ]
    return (
        f"\n\nScaling: warm local clusters of single-threaded workers, {result['scaling_images']} photos, "
        f"batch loop, median of {result['reps']}; efficiency = rate ÷ (workers × the 1-worker rate).\n\n"
        "| workers | images/s | efficiency | per repetition |\n|---:|---:|---:|---|\n" + "\n".join(rows)
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_cluster --scaling``: the scaling part alone, sized for a short lease on a
    many-core machine (the full section also times commands and a cold cluster)."""
    import argparse
    import json

    import distributed

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_cluster")
    ap.add_argument("--scaling", action="store_true", required=True, help="measure 1, 2, 4, … workers")
    ap.add_argument("--reps", type=int, default=1, help="repetitions per cluster size (median)")
    ap.add_argument("--images", type=int, default=0, help="photos (default: 128 per core, at least 1,024)")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    m = args.images or max(1024, 4 * BATCH * cores)
    OUT.mkdir(parents=True, exist_ok=True)
    photos = str(make_photos(OUT / f"photos-{m}", m))
    result = {"reps": args.reps, "scaling_images": m}
    result["scaling"] = _scaling(distributed, photos, m, args.reps, cores)
    (OUT / "cluster-scaling.json").write_text(json.dumps(result, indent=2))
    print(_scaling_markdown(result).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
