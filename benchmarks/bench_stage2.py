"""Stage 2 near its limit (issue 40, part 2): the logistic head's float32 L-BFGS against the BLAS limit of
its own gradient, from 100k to 1M rows, its peak memory against the features, and its accuracy against
scikit-learn's lbfgs where scikit-learn finishes.

The rows are real: EfficientNet-Lite0 features of Fashion-MNIST at 32 px (the demo's features, extracted
once into ``out/stage2/``), tiled to N rows with Gaussian noise (σ = half of each feature's spread) so no
two rows are equal; the test rows are tiled from the cache's test split the same way. Each size runs in a
fresh process, so its peak RSS (``VmHWM``) is its own: rows made and standardized in place, the fit.
The gradient's limit is timed in the same process: ``X @ W`` and ``X.T @ G``, the two products one
L-BFGS evaluation costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZES = tuple(int(n) for n in os.environ.get("BENCH_STAGE2_ROWS", "100000,300000,1000000").split(","))
QUICK_SIZES = (20_000, 50_000)
NOISE = 0.5  # of each feature's standard deviation


def cpu_flags() -> list[str]:
    """The instruction sets float32 BLAS (and int8 engines) can use, as /proc/cpuinfo names them."""
    from benchmarks.bench_dynamic import instruction_sets

    flags = instruction_sets()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    return (
        flags + (["AVX-512F"] if " avx512f " in text else []) + (["AMX-BF16"] if "amx_bf16" in text else [])
    )


def demo_features(out_dir: Path, quick: bool) -> Path:
    """The demo's features (Fashion-MNIST, 32 px, Lite0) as one .npz: extracted once, then reused."""
    target = out_dir / "stage2" / ("features-quick.npz" if quick else "features.npz")
    if target.is_file():
        return target
    from pipeline.cache.store import FeatureCache
    from pipeline.stages.extract import extract
    from pipeline.utils.config import load_config

    overrides = {
        "backbone.image_size": 32,
        "extract.cache_dir": str(out_dir / "stage2" / "cache"),
        "extract.progress": False,
        **({"data.limit": 4000} if quick else {}),
    }
    path = extract(load_config(None, overrides)).path
    with FeatureCache(path) as c:
        tr, te = c.rows("train"), c.rows("test")
        arrays = {
            "Xtr": c.features(None, tr),
            "ytr": c.labels[tr],
            "Xte": c.features(None, te),
            "yte": c.labels[te],
        }
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, **arrays)
    return target


def tiled(X: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows drawn from ``X`` with Gaussian noise, made block by block straight into float32."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(X), n)
    out = np.empty((n, X.shape[1]), np.float32)
    sd = (NOISE * X.std(axis=0)).astype(np.float32)
    for i in range(0, n, 1 << 15):
        j = idx[i : i + (1 << 15)]
        out[i : i + len(j)] = X[j] + rng.standard_normal((len(j), X.shape[1]), np.float32) * sd
    return out, y[idx]


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux ≥ 4.0): the fit's peak, not the rows' generation."""
    Path("/proc/self/clear_refs").write_text("5")


def vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return -1.0


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return -1.0


def gradient_seconds(X: np.ndarray, k: int, reps: int = 3) -> float:
    """Best of ``reps``: one loss/gradient's two products on these rows, ``X @ W`` and ``X.T @ G``."""
    W = np.random.default_rng(0).standard_normal((X.shape[1], k)).astype(X.dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        G = X @ W
        _ = X.T @ G
        best = min(best, time.perf_counter() - t0)
    return best


def one_size(features: Path, n: int) -> dict[str, Any]:
    """In this (fresh) process: N tiled rows standardized in place, the logistic head fitted on them."""
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads.registry import make_head
    from pipeline.heads.transforms import fit_transform_owned, transform_owned

    python = vm_rss_mib()  # the interpreter and its libraries, before any row
    with np.load(features) as z:
        Xb, yb, Xtb, ytb = z["Xtr"], z["ytr"], z["Xte"], z["yte"]
    X, y = tiled(Xb, yb, n, seed=1)
    Xte, yte = tiled(Xtb, ytb, max(10_000, n // 10), seed=2)
    del Xb, Xtb
    reset_peak()  # from here on: what train does with rows it has read
    base = vm_rss_mib()
    scaler = StandardScaler()
    X = fit_transform_owned(scaler, X)
    Xte = transform_owned(scaler, Xte)
    grad_s = gradient_seconds(X, len(np.unique(y)))
    est = make_head("logistic").estimator
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    fit_s = time.perf_counter() - t0
    return {
        "rows": n,
        "features_mib": round(X.nbytes / 2**20, 1),
        "fit_s": round(fit_s, 2),
        "n_iter": int(est.n_iter_[0]),
        "passes": int(est.n_passes_),
        "gradient_s": round(grad_s, 4),
        "fit_per_pass_s": round(fit_s / est.n_passes_, 4),
        "limit_ratio": round(fit_s / (est.n_passes_ * grad_s), 2),
        "test_acc": round(float(est.score(Xte, yte)), 4),
        "start_mib": round(base, 1),
        "peak_mib": round(vm_hwm_mib(), 1),
        "python_mib": round(python, 1),
        # the rows held plus all the fit added, against the rows' float32 size: train's "≤ 2×" goal
        "peak_over_features": round((vm_hwm_mib() - python) / (X.nbytes / 2**20 + Xte.nbytes / 2**20), 2),
    }


def against_sklearn(features: Path) -> dict[str, Any]:
    """The demo's train rows, standardized: this solver and scikit-learn's lbfgs (max_iter=1000, the head's
    former setting), test accuracy and time of each."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads.registry import make_head

    with np.load(features) as z:
        X, y, Xte, yte = z["Xtr"], z["ytr"], z["Xte"], z["yte"]
    scaler = StandardScaler().fit(X)
    X, Xte = scaler.transform(X), scaler.transform(Xte)
    ours = make_head("logistic").estimator
    t0 = time.perf_counter()
    ours.fit(X, y)
    t_ours = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ref = LogisticRegression(max_iter=1000).fit(X, y)
        t_ref = time.perf_counter() - t0
    return {
        "rows": len(X),
        "ours_s": round(t_ours, 1),
        "ours_iter": int(ours.n_iter_[0]),
        "ours_acc": round(float(ours.score(Xte, yte)), 4),
        "sklearn_s": round(t_ref, 1),
        "sklearn_iter": int(np.max(ref.n_iter_)),
        "sklearn_acc": round(float(ref.score(Xte, yte)), 4),
        "agree": round(float(np.mean(ours.predict(Xte) == ref.predict(Xte))), 4),
    }


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    features = demo_features(out_dir, quick)
    sizes = QUICK_SIZES if quick else SIZES
    rows = []
    for n in sizes:  # each size in a fresh process: its peak RSS is its own
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_stage2", "--one", str(features), str(n)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(f"{n} rows: {proc.stderr[-1500:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return {
        "cpu": cpu_flags(),
        "cores": os.cpu_count(),
        "sizes": rows,
        "sklearn": against_sklearn(features) if os.environ.get("BENCH_STAGE2_SKLEARN", "1") != "0" else None,
        "goal": "1M rows in about a minute; accuracy within 0.3 point of scikit-learn's lbfgs",
    }


def markdown(r: dict[str, Any]) -> str:
    s = r["sklearn"]
    lines = [
        f"CPU: {', '.join(r['cpu']) or 'no AVX2/VNNI/AMX flags'}, {r['cores']} cores. Rows: real Lite0 features of"
        " Fashion-MNIST (32 px) tiled with noise, 1280-d, 10 classes, float32; each size in a fresh process"
        " (benchmarks/bench_stage2.py).",
        "",
        "| rows | features | fit | iterations | passes | one gradient (2 matmuls) | fit / (passes × gradient) | test acc | RSS: interpreter / rows made / peak | (peak − interpreter) / rows |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["sizes"]:
        lines.append(
            f"| {x['rows']:,} | {x['features_mib']:.0f} MiB | {x['fit_s']} s | {x['n_iter']} | {x['passes']} |"
            f" {x['gradient_s']} s | {x['limit_ratio']} | {x['test_acc']} |"
            f" {x['python_mib']:.0f} / {x['start_mib']:.0f} / {x['peak_mib']:.0f} MiB |"
            f" {x['peak_over_features']} |"
        )
    if s is None:
        return "\n".join(lines)
    lines += [
        "",
        f"Against scikit-learn's lbfgs (`LogisticRegression(max_iter=1000)`, the head before) on the demo's"
        f" {s['rows']:,} standardized train rows: this solver {s['ours_s']} s, {s['ours_iter']} iterations,"
        f" test accuracy {s['ours_acc']}; scikit-learn {s['sklearn_s']} s, {s['sklearn_iter']} iterations,"
        f" {s['sklearn_acc']}; the same prediction on {s['agree']:.1%} of the test images.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one_size(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        res = run(REPO / "benchmarks" / "out", quick="--quick" in sys.argv)
        print(markdown(res))
