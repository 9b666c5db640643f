"""The similarity index of a cache, its own layer above the cache and below the heads and stages: exact
blocked cosine search (``neighbours``), the FAISS index chosen under a memory budget (``kinds``), kept
beside the cache and keyed to its rows (``store``), searched with filters (``search``), and novelty
(``novelty``). Used by ``find``, ``audit``'s near-duplicates, the novelty threshold a run records and
``predict``'s novelty."""
