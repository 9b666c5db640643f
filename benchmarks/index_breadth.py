"""The audit's HNSW breadth (issue 40): how fast, and how close to ``efSearch`` 256, its near-copy pass is.

``python -m benchmarks.index_breadth <cache.h5> [queries]`` opens the cache's FAISS index (built beside it by
an earlier ``audit`` or ``find``), asks it for the 16 nearest rows of a sample of its own rows at each
breadth, and prints the time per query and how many of the pairs with cosine ≥ 0.85 and of the nearest rows
that 256 found each breadth finds again (the audit looks for near copies only: ``index.kinds.SCAN_EF_SEARCH``).
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(path: str, queries: int = 10_000) -> None:
    from pipeline.cache.store import FeatureCache
    from pipeline.index.search import open_index
    from pipeline.utils.config import resolve_config

    cfg = resolve_config(None, "audit")
    with FeatureCache(path) as cache:
        index = open_index(cache, cache.default_layer(), cfg.index)
        if index.kind is None or not index.kind.ef_search:
            raise SystemExit(f"{path}: no HNSW index at this size ({index.name})")
        rows = np.sort(
            np.random.default_rng(0).choice(cache.n_rows, min(queries, cache.n_rows), replace=False)
        )
        Q, ref = index.vectors(rows), None
        for ef in (256, 128, 64, 32):
            t0 = time.perf_counter()
            sims, nb = index.search(Q, 16, exclude=rows, ef_search=ef)
            seconds = time.perf_counter() - t0
            pairs = set(
                zip(
                    np.repeat(rows, 16)[sims.ravel() >= 0.85].tolist(),
                    nb.ravel()[sims.ravel() >= 0.85].tolist(),
                    strict=True,
                )
            )
            ref = ref or (nb, pairs)
            found = len(pairs & ref[1]) / max(1, len(ref[1]))
            same = float((nb[:, 0] == ref[0][:, 0]).mean())
            print(
                f"efSearch {ef:3d}: {seconds / len(rows) * 1e6:6.0f} us a query; pairs >= 0.85: {found:.4f} of"
                f" 256's {len(ref[1])}; the same nearest row: {same:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
