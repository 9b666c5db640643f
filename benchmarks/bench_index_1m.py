"""The million-row run of the ``index`` section (``python -m benchmarks.bench_index_1m [ROWS]``): the
default budget's index only, recall@10 by ``efSearch``, and the audit's pass timed on 50,000 random rows and
multiplied to the whole (the whole pass is minutes; the exact scan it replaces, hours). Writes
``benchmarks/out/index-<rows>.json``; the figures are in ``benchmarks/notes/index.md``. Needs ≈ 11 GB of
memory at 1M × 1280 (the rows and the index)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_index import DIM, ArrayCache, exact_top, measure, synthetic


def main(n: int = 1_000_000) -> dict:
    import faiss

    from pipeline.index.neighbours import l2_normalize
    from pipeline.index.search import open_index
    from pipeline.utils.config import IndexConfig

    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    cache = ArrayCache(out_dir / f"synthetic-{n}.h5", synthetic(n))
    s = {"rows": n, "dim": DIM, "generate_s": round(time.perf_counter() - t0, 1)}
    measure(cache, "features", s, memory_gb=IndexConfig().memory_gb)
    index = open_index(cache, "features", IndexConfig(exact_below=0), note=lambda line: None)
    rows = np.sort(np.random.default_rng(1).choice(n, 1000, replace=False))
    Q = l2_normalize(cache.features("features", rows))
    truth = exact_top(Q, cache, "features", 11)
    s["by_ef_search"] = {}
    for ef in (128, 192, 256, 384, 512):
        faiss.ParameterSpace().set_index_parameter(index.faiss_index, "efSearch", ef)
        t0 = time.perf_counter()
        _, ids = index.faiss_index.search(Q, 11)
        ms = (time.perf_counter() - t0) / len(Q) * 1000
        got = np.where(ids >= 0, index.row_of[np.maximum(ids, 0)], -1)
        pairs = zip(truth, got, rows, strict=True)
        recall = np.mean(
            [len(set(t[t != r][:10].tolist()) & set(g[g != r][:10].tolist())) / 10 for t, g, r in pairs]
        )
        s["by_ef_search"][ef] = {"recall_at_10": round(float(recall), 4), "ms": round(ms, 3)}
    sample = np.sort(np.random.default_rng(2).choice(n, min(n, 50_000), replace=False))
    t0 = time.perf_counter()
    for start in range(0, len(sample), 8192):
        part = sample[start : start + 8192]
        index.search(index.vectors(part), 16, exclude=part)
    per_row = (time.perf_counter() - t0) / len(sample)
    s["index_scan_per_row_ms"], s["index_scan_extrapolated_s"] = round(per_row * 1000, 3), round(per_row * n)
    (out_dir / f"index-{n}.json").write_text(json.dumps(s, indent=2))
    return s


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000), indent=2))
