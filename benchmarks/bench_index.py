"""The similarity index (issue 37): recall@10 of the FAISS index against exact search, build time, index
size and query latency, and the audit's near-duplicate pass exact vs through the index.

Two kinds of data:

* **real**: a Fashion-MNIST cache made by ``featcache extract`` (EfficientNet-Lite0, 64 px, the first
  ``FMNIST_ROWS`` images), searched exactly and through the index ``open_index`` builds when forced
  (``index.exact_below`` 0); the audit's pairs compared between the two.
* **synthetic**: ``ROWS`` rows of 1280 dimensions written from a generative model shaped like pooled CNN
  features (non-negative, clustered, low intrinsic dimension: 2,000 cluster centres in a 64-d latent space,
  a random 64 → 1280 map, ReLU, isotropic noise), served to the index through a cache-shaped object over
  the array (keys, content ids, splits, ``features(rows)``), so ``open_index`` builds, saves, reloads and
  searches exactly as on a cache file. ``BENCH_INDEX_ROWS`` (comma-separated) sets the sizes; each is also measured under the
  smaller budgets that make it IVF-Flat, IVF-SQ8 and IVF-PQ (``BENCH_INDEX_SWEEP=0``: not).

Recall@10: the share of the exact top 10 (``cosine_topk``, itself blocked matrix products) found in the
index's top 10, over 1,000 random row queries (the row itself excluded). Latency: one query at a time
and a batch of 1,000, after the index is open. The exact all-pairs scan is timed on growing prefixes and
extrapolated as n² (it is a fixed number of products per pair); the index's pass is measured whole.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 1280
FMNIST_ROWS = 10_000


class ArrayCache:
    """What the index reads of a cache, over an in-memory array (the synthetic rows)."""

    def __init__(self, path: Path, X: np.ndarray, seed: int = 0):
        self.path, self.X = path, X
        self.n_rows = len(X)
        self.fingerprint = f"synthetic-{len(X)}-{X.shape[1]}-{seed}"
        self.keys = [f"row/{i:07d}" for i in range(len(X))]
        self.ids = [f"{i:064x}" for i in range(len(X))]
        self.split = np.random.default_rng(seed).choice(3, len(X), p=[0.8, 0.1, 0.1]).astype(np.uint8)
        self.multilabel = False

    def dataset(self, layer=None):
        return self.X

    def features(self, layer=None, rows=None, dtype=np.float32):
        return self.X if rows is None else self.X[np.asarray(rows)]

    def rows(self, split=None):
        from pipeline.utils.config import SPLITS

        return np.flatnonzero(self.split == SPLITS.index(split))


def synthetic(n: int, d: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, 64)).astype(np.float32)
    W = rng.normal(size=(64, d)).astype(np.float32) / 8
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        z = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.normal(size=(m, 64)).astype(np.float32)
        out[start : start + m] = np.maximum(z @ W, 0) + 0.05 * np.abs(rng.normal(size=(m, d)))
    return out


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(cache, layer: str, out: dict[str, Any], queries: int = 1000, memory_gb: float = 4.0) -> None:
    """Build (or catch up) the index of ``cache`` and measure it against exact search into ``out``."""
    from pipeline.index.neighbours import l2_normalize
    from pipeline.index.search import open_index
    from pipeline.index.store import index_dir
    from pipeline.utils.config import IndexConfig

    cfg = IndexConfig(exact_below=0, memory_gb=memory_gb)
    folder = index_dir(cache.path, layer)
    shutil.rmtree(folder, ignore_errors=True)  # built from nothing, timed
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    index = open_index(cache, layer, cfg, note=lambda line: None)
    out.update(kind=index.name, build_s=round(time.perf_counter() - t0, 2))
    out["index_mb"] = round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1)
    out["rss_growth_mb"] = round(_rss_mb() - rss0, 1)
    del index  # one index in memory at a time
    t0 = time.perf_counter()
    index = open_index(cache, layer, cfg, note=lambda line: None)  # read back, checked, served
    out["open_s"] = round(time.perf_counter() - t0, 2)
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(cache.n_rows, min(queries, cache.n_rows), replace=False))
    Q = l2_normalize(cache.features(layer, rows))
    t0 = time.perf_counter()
    truth = exact_top(Q, cache, layer, 11)
    out["exact_query_ms"] = round((time.perf_counter() - t0) / len(rows) * 1000, 3)
    t0 = time.perf_counter()
    _, got = index.search(Q, 10, exclude=rows)
    out["batch_query_ms"] = round((time.perf_counter() - t0) / len(rows) * 1000, 3)
    t0 = time.perf_counter()
    for i in range(min(100, len(rows))):
        index.search(Q[i : i + 1], 10, exclude=rows[i : i + 1])
    out["single_query_ms"] = round((time.perf_counter() - t0) / min(100, len(rows)) * 1000, 3)
    recall = [
        len(set(t[t != r][:10].tolist()) & set(g.tolist())) / 10
        for t, g, r in zip(truth, got, rows, strict=True)
    ]
    out["recall_at_10"] = round(float(np.mean(recall)), 4)


def exact_top(Q: np.ndarray, cache, layer: str, k: int, block: int = 100_000) -> np.ndarray:
    """The exact top ``k`` rows of each query, reading the cache a block of rows at a time (memory: one
    block, not a normalized copy of every row)."""
    from pipeline.index.neighbours import cosine_topk

    best_sim = np.full((len(Q), k), -np.inf, np.float32)
    best_idx = np.full((len(Q), k), -1, np.int64)
    for start in range(0, cache.n_rows, block):
        rows = np.arange(start, min(start + block, cache.n_rows))
        sims, idx = cosine_topk(Q, cache.features(layer, rows), k)
        all_sim = np.concatenate([best_sim, sims], axis=1)
        all_idx = np.concatenate([best_idx, np.where(idx >= 0, idx + start, -1)], axis=1)
        order = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]
        best_sim, best_idx = np.take_along_axis(all_sim, order, 1), np.take_along_axis(all_idx, order, 1)
    return best_idx


def scan_times(cache, layer: str, out: dict[str, Any], prefixes: tuple[int, ...]) -> None:
    """The audit's pass: exact on prefixes (extrapolated as n²) and through the index (measured)."""
    from pipeline.index.neighbours import cosine_scan
    from pipeline.index.search import open_index
    from pipeline.utils.config import IndexConfig

    X = cache.features(layer)
    per_pair = []
    for m in prefixes:
        t0 = time.perf_counter()
        cosine_scan(X[:m], 0.85)
        per_pair.append((time.perf_counter() - t0) / (m * m / 2))
    out["exact_scan_measured"] = {
        str(m): round(p * m * m / 2, 1) for m, p in zip(prefixes, per_pair, strict=True)
    }
    rate = per_pair[-1]
    out["exact_scan_extrapolated_s"] = {
        str(n): round(rate * n * n / 2) for n in (100_000, 300_000, 1_000_000)
    }
    index = open_index(cache, layer, IndexConfig(exact_below=0), note=lambda line: None)
    t0 = time.perf_counter()
    index.scan(0.85, 16)
    out["index_scan_s"] = round(time.perf_counter() - t0, 1)
    out["index_scan_per_1m_s"] = round(out["index_scan_s"] / cache.n_rows * 1_000_000)


def real_cache(out_dir: Path, quick: bool) -> Path:
    from pipeline.stages.extract import extract
    from pipeline.utils.config import load_config

    overrides = {
        "data.source": "fashion_mnist",
        "data.limit": 2000 if quick else FMNIST_ROWS,
        "backbone.image_size": 64,
        "extract.cache_dir": str(out_dir / "index-cache"),
        "extract.progress": False,
    }
    return Path(extract(load_config(None, overrides)).path)


def audit_pairs(cache, layer: str, exact_below: int) -> set[tuple[str, str]]:
    """The audit's near-duplicate pairs (default thresholds), exact or through the index."""
    from pipeline.index.search import open_index
    from pipeline.utils.config import AuditConfig, IndexConfig

    a = AuditConfig()
    index = open_index(cache, layer, IndexConfig(exact_below=exact_below), note=lambda line: None)
    scan = index.scan(min(a.threshold, a.exact), 16)
    nearest = scan.top_index[:, 0]
    mutual = (nearest[scan.a] == scan.b) & (nearest[scan.b] == scan.a)
    second = np.maximum(scan.top_sim[scan.a, 1], scan.top_sim[scan.b, 1])
    keep = (scan.similarity >= a.exact) | (
        mutual & (scan.similarity >= a.threshold) & (scan.similarity - second >= a.margin)
    )
    return {(cache.keys[i], cache.keys[j]) for i, j in zip(scan.a[keep], scan.b[keep], strict=True)}


def run(out_dir: Path, quick: bool) -> dict[str, Any]:
    from pipeline.cache.store import FeatureCache
    from pipeline.utils.config import IndexConfig

    results: dict[str, Any] = {"real": {}, "synthetic": {}}
    path = real_cache(out_dir, quick)
    with FeatureCache(path) as cache:
        layer = cache.default_layer()
        r = results["real"]
        r["rows"] = cache.n_rows
        measure(cache, layer, r)
        exact, through = audit_pairs(cache, layer, 10**9), audit_pairs(cache, layer, 0)
        r["audit_pairs_exact"], r["audit_pairs_index"] = len(exact), len(through)
        r["audit_pairs_same"] = len(exact & through)
    sizes = [20_000] if quick else [int(x) for x in os.environ.get("BENCH_INDEX_ROWS", "100000").split(",")]
    for n in sizes:
        X = synthetic(n)
        cache = ArrayCache(out_dir / f"synthetic-{n}.h5", X)
        s = results["synthetic"][str(n)] = {"rows": n, "dim": DIM}
        measure(cache, "features", s, memory_gb=IndexConfig().memory_gb)
        scan_times(cache, "features", s, (5_000, 10_000) if quick else (10_000, 20_000))
        s["smaller_budgets"] = []
        sweep = os.environ.get("BENCH_INDEX_SWEEP", "1") != "0"  # 0: the default budget's index only
        for gb in smaller_budgets(n, DIM) if sweep else []:
            s["smaller_budgets"].append(sb := {"rows": n, "memory_gb": round(gb, 3)})
            measure(cache, "features", sb, memory_gb=gb)
        del X, cache
    return results


def smaller_budgets(n: int, d: int) -> list[float]:
    """The budgets (GiB) that make the index IVF-Flat, IVF-SQ8 and IVF-PQ (160 bytes a row) for n × d."""
    from pipeline.index.kinds import GIB, IndexKind, lists_for

    c = lists_for(n)
    flat, sq8 = IndexKind(f"IVF{c},Flat").bytes(n, d), IndexKind(f"IVF{c},SQ8").bytes(n, d)
    return [flat * 1.001 / GIB, sq8 * 1.001 / GIB, n * (160 + 8) * 1.001 / GIB]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| data | rows | index | build s | index MB | open s | recall@10 | query ms (1 / batch) | exact query ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("Fashion-MNIST, Lite0 64 px", results["real"])]
    for s in results["synthetic"].values():
        rows.append(("synthetic 1280-d", s))
        rows += [(f"synthetic, {b['memory_gb']} GiB budget", b) for b in s.get("smaller_budgets", [])]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['rows']:,} | `{r['kind']}` | {r['build_s']} | {r['index_mb']} | {r['open_s']} | "
            f"{r['recall_at_10']:.3f} | {r['single_query_ms']} / {r['batch_query_ms']} | {r['exact_query_ms']} |"
        )
    r = results["real"]
    lines += [
        "",
        f"Audit near-duplicates on the Fashion-MNIST cache: {r['audit_pairs_exact']} pairs exact, "
        f"{r['audit_pairs_index']} through the index, {r['audit_pairs_same']} in both.",
        "",
        "| rows | exact all-pairs scan, measured s | extrapolated (n²) s: 100k / 300k / 1M | index pass s | index pass per 1M rows s |",
        "|---|---|---|---|---|",
    ]
    for s in results["synthetic"].values():
        ex = s["exact_scan_extrapolated_s"]
        measured = ", ".join(f"{int(m):,}: {t}" for m, t in s["exact_scan_measured"].items())
        lines.append(
            f"| {s['rows']:,} | {measured} | {ex['100000']:,} / {ex['300000']:,} / {ex['1000000']:,} | "
            f"{s['index_scan_s']} | {s['index_scan_per_1m_s']:,} |"
        )
    return "\n".join(lines)
