"""Which FAISS index a cache gets: chosen from its row count, dimension and a memory budget, as autofaiss
chooses (``get_optimal_index_keys_v2``, the rule clip-retrieval builds its indexes with), so the choice is
one that a well-kept library already stands behind.

In order of preference, the first that fits ``memory_gb``:

* ``HNSW{M},Flat``: a graph over the full vectors, no training, rows added one by one; ``4·n·(d + 2M)``
  bytes, ``M = min(32, ⌊(budget / 4n − d) / 2⌋)``, taken when ``M ≥ 8``;
* ``IVF{c},Flat``: ``c ≈ 4√n`` (a power of two) k-means lists over the full vectors, ``4·n·d`` bytes;
* ``IVF{c},SQ8``: the same lists, one byte per dimension (``n·d`` bytes);
* ``IVF{c},PQ{m}x8``: product quantization, ``m`` bytes a row, the largest ``m`` dividing ``d`` that fits.

Search breadth (HNSW ``efSearch``, IVF ``nprobe``) is set from the measured recall@10 ≥ 0.95 of
``benchmarks/bench_index.py``; vectors are L2-normalized, so inner product is cosine similarity. A quantized
index (SQ8, PQ) is asked for 4 × k candidates, re-ranked by the exact features read from the cache itself
(the cache is the full-precision store a FAISS "refine" stage would otherwise keep in memory).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GIB = 1024**3
#: HNSW breadth of the audit's pass over every row, which looks for near copies only (cosine ≥ 0.85 among
#: each row's nearest): a near copy is the easiest neighbour to find. 10,000 queries into a 1M-row
#: HNSW32 index (1280-d): efSearch 256 1,104 µs a query, 64 378 µs, finding 99.8 % of the pairs ≥ 0.85
#: 256 found and the same nearest row for 99.9 % of the queries (32: 226 µs, 99.1 %)
SCAN_EF_SEARCH = 64


@dataclass(frozen=True)
class IndexKind:
    """A FAISS factory string and how broadly it is searched."""

    factory: str
    ef_search: int = 0  # HNSW: candidates kept while walking the graph
    nprobe: int = 0  # IVF: lists scanned per query

    @property
    def quantized(self) -> bool:
        """Whether the index holds approximate vectors (SQ8, PQ): its candidates are re-ranked exactly."""
        return self.factory.endswith(("SQ8",)) or ",PQ" in self.factory

    @property
    def trained(self) -> bool:
        """Whether building needs a training pass first (IVF k-means, quantizers)."""
        return self.factory.startswith("IVF")

    def bytes(self, n: int, d: int) -> int:
        """The index's estimated size for ``n`` rows of ``d`` dimensions."""
        if self.factory.startswith("HNSW"):
            m = int(re.match(r"HNSW(\d+)", self.factory).group(1))
            return 4 * n * (d + 2 * m)
        per_row = {"Flat": 4 * d, "SQ8": d}.get(self.factory.split(",")[1])
        if per_row is None:
            per_row = int(re.search(r"PQ(\d+)", self.factory).group(1))
        return n * (per_row + 8)  # + the row's id in its list


def lists_for(n: int) -> int:
    """IVF lists: a power of two near ``4√n`` (autofaiss), at least 16, at most n / 39 (FAISS's minimum
    training points per list)."""
    target = max(16, min(4 * math.sqrt(n), n / 39))
    return max(1, 2 ** round(math.log2(target)))


def choose_kind(n: int, d: int, memory_gb: float) -> IndexKind:
    """The index for ``n`` rows of ``d`` dimensions within ``memory_gb`` GiB (see the module's order)."""
    budget = memory_gb * GIB
    m = int((budget / (4 * max(n, 1)) - d) / 2)
    if m >= 8:
        return IndexKind(f"HNSW{min(m, 32)},Flat", ef_search=256)  # 128: recall@10 0.945 at 1M rows
    c = lists_for(n)
    nprobe = max(16, c // 16)
    for code in ("Flat", "SQ8"):
        kind = IndexKind(f"IVF{c},{code}", nprobe=nprobe)
        if kind.bytes(n, d) <= budget:
            return kind
    fits = [m for m in range(1, d + 1) if d % m == 0 and n * (m + 8) <= budget and m <= 256]
    if not fits:
        from pipeline.utils.errors import FeatcacheError

        raise FeatcacheError(
            f"index.memory_gb={memory_gb}: too small for any index of {n} rows (raise index.memory_gb)"
        )
    return IndexKind(f"IVF{c},PQ{max(fits)}x8", nprobe=nprobe)
