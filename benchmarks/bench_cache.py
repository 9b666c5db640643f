"""Cache behaviour, extraction memory and start-up time (issue 5, items 4-6).

Every figure comes from real ``featcache`` subprocesses on a generated folder of ordinary JPEG photos:
peak RSS as the child's own VmHWM (see benchmarks/peak_rss.py), wall times as medians.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_engines import make_photos
from benchmarks.peak_rss import peak_rss

REPO = Path(__file__).resolve().parents[1]


def run_featcache(*args: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one ``featcache`` run."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"featcache {' '.join(args)} failed: {proc.stderr[-400:]}")
    return time.perf_counter() - t0, proc.stdout


def bench_memory(work: Path, n: int) -> dict[str, Any]:
    """Peak RSS of ``extract`` at N and 4N images: memory must follow the batch, not the dataset."""
    photos = make_photos(work / "mem_photos", 4 * n, seed=1)
    out = {}
    for label, count in (("N", n), ("4N", 4 * n)):
        cache = work / f"mem_cache_{label}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        args = ["extract", "--data", str(photos), "--limit", str(count), "--cache-dir", str(cache), "--quiet"]
        rss, _, _ = peak_rss(args, cwd=REPO)
        secs = time.perf_counter() - t0
        out[label] = {"images": count, "peak_rss_mib": round(rss, 1), "seconds": round(secs, 1)}
    out["growth"] = round(out["4N"]["peak_rss_mib"] / out["N"]["peak_rss_mib"] - 1.0, 4)
    out["goal"] = "growth <= 0.10"
    out["met"] = out["growth"] <= 0.10
    return out


def bench_cache_behaviour(work: Path, n: int, reps: int) -> dict[str, Any]:
    """Full run, no-op rerun, and +1 % new images: the rerun costs nothing, the increment only its images."""
    photos = work / "cache_photos_run"
    shutil.rmtree(photos, ignore_errors=True)
    shutil.copytree(make_photos(work / "cache_photos", n, seed=2), photos)  # a fresh copy: we add files below
    cache = work / "cache_cache"
    shutil.rmtree(cache, ignore_errors=True)
    args = ["extract", "--data", str(photos), "--cache-dir", str(cache), "--quiet"]
    full, _ = run_featcache(*args)
    noop = statistics.median(run_featcache(*args)[0] for _ in range(reps))
    extra = max(1, n // 100)
    for src in sorted(make_photos(work / "cache_photos_extra", extra, seed=3).glob("*/*.jpg")):
        shutil.copy(src, photos / src.parent.name / f"new_{src.name}")
    add, stdout = run_featcache(*args)
    extracted = int(stdout.split(" extracted")[0].split("·")[-1])
    return {
        "images": n,
        "full_seconds": round(full, 2),
        "noop_seconds": round(noop, 2),
        "noop_goal": "<= 2 s",
        "noop_met": noop <= 2.0,
        "added_images": extra,
        "add_extracted": extracted,
        "add_seconds": round(add, 2),
        "add_proportional": extracted == extra,
        "full_seconds_per_image": round(full / n, 4),
    }


def bench_startup(reps: int) -> dict[str, Any]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pipeline", "--help"], cwd=REPO, check=True, capture_output=True
        )
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"help_seconds": round(med, 3), "goal": "<= 1 s", "met": med <= 1.0}


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "startup": bench_startup(5),
        "cache": bench_cache_behaviour(work, 300 if quick else 2000, 3),
        "memory": bench_memory(work, 100 if quick else 500),
    }
    (out_dir / "cache.json").write_text(json.dumps(result, indent=2))
    return result


def markdown(r: dict[str, Any]) -> str:
    c, m, s = r["cache"], r["memory"], r["startup"]
    return "\n".join(
        [
            "| measure | value | goal | met |",
            "|---|---|---|---|",
            f"| `featcache --help` | {s['help_seconds']} s | ≤ 1 s | {'yes' if s['met'] else 'no'} |",
            f"| full extract, {c['images']} JPEGs | {c['full_seconds']} s | | |",
            f"| no-op rerun | {c['noop_seconds']} s | ≤ 2 s | {'yes' if c['noop_met'] else 'no'} |",
            f"| +{c['added_images']} new images (1 %) | {c['add_seconds']} s, {c['add_extracted']} extracted | only the new ones | "
            f"{'yes' if c['add_proportional'] else 'no'} |",
            f"| peak RSS, extract {m['N']['images']} images | {m['N']['peak_rss_mib']} MiB | | |",
            f"| peak RSS, extract {m['4N']['images']} images | {m['4N']['peak_rss_mib']} MiB | growth ≤ 10 % | "
            f"{m['growth'] * 100:+.1f} % {'yes' if m['met'] else 'no'} |",
        ]
    )


if __name__ == "__main__":  # pragma: no cover
    out = REPO / "benchmarks" / "out"
    res = run(out, quick="--quick" in sys.argv)
    print(markdown(res))
