"""``featcache find``: the cached rows most similar to a query — image files or folders, cached keys, or
words — by cosine similarity of the cache's features (:mod:`pipeline.index`).

Query images are read as extraction reads them and their features taken from the cache when their content
is there, else computed by the cache's own backbone, decode policy and engine
(:func:`pipeline.model.image_features.source_features`, what ``predict`` uses; with ``--cluster`` on Dask
workers). A ``--key`` query is a cached row's own features, and that row is never its own neighbour.
``--split`` and ``--class`` keep only rows of those splits and classes. ``--text`` needs a backbone with a
text tower (:func:`text_features`). Exact search below ``index.exact_below`` rows, a FAISS index above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.config import SPLITS, Config, resolve_config
from pipeline.utils.errors import FeatcacheError


@dataclass
class FindResult:
    """The answers of ``featcache find``: one entry per query, in the order given (images, keys, texts)."""

    cache: Path
    layer: str
    index: str  # exact, or the FAISS index's factory string
    queries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [q for q in self.queries if q.get("error")]

    def to_json(self) -> list[dict[str, Any]]:
        """``[{"query", "kind", "neighbors": [{"key", "label", "split", "similarity", "rank"}], ...}]``."""
        return self.queries

    def table(self) -> str:
        lines = [f"find in {self.cache.name} · layer {self.layer} · {self.index} search"]
        for q in self.queries:
            how = f" (features: {q['features']})" if q.get("features") else ""
            lines += ["", f"{q['kind']}: {q['query']}{how}"]
            if q.get("error"):
                lines.append(f"  error: {q['error']}")
                continue
            if not q["neighbors"]:
                lines.append("  no rows match the filters")
                continue
            width = max(5, *(len(_label_text(n["label"])) for n in q["neighbors"]))
            lines.append(f"  {'#':>3}  {'cosine':>7}  {'split':<5}  {'label':<{width}}  key")
            for n in q["neighbors"]:
                label = _label_text(n["label"])
                lines.append(
                    f"  {n['rank']:>3}  {n['similarity']:>7.4f}  {n['split']:<5}  {label:<{width}}  {n['key']}"
                )
        return "\n".join(lines)


def _label_text(label) -> str:
    return ";".join(label) if isinstance(label, list) else str(label)


def text_features(cache, layer: str, texts: list[str]) -> np.ndarray:
    """The features of ``texts`` in the joint image-text space of the open ``cache``'s backbone: a CLIP or
    SigLIP preset's text tower (:mod:`pipeline.features.text`; each text embedded once, kept beside the
    cache), for a cache of its ``pooled`` image embedding; anything else is one line."""
    from pipeline.features.text import embed_prompts
    from pipeline.heads.zeroshot import cache_text_tower, check_joint_space

    try:
        tower = cache_text_tower(cache.meta)
    except FeatcacheError as e:
        raise FeatcacheError(f"--text needs a backbone with a text tower: {e}") from None
    check_joint_space(cache.meta, "--text")
    return embed_prompts(tower, list(texts), Path(cache.path).resolve().parent).astype(np.float32)


def _key_rows(cache, keys: list[str]) -> list[int]:
    from pipeline.index.rows import find_rows

    row_of = find_rows(cache.keys, keys)
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise FeatcacheError(f"--key {missing[0]}: not in the cache {cache.path.name}")
    return [row_of[k] for k in keys]


def _allowed(cache, splits: list[str], classes: list[str]) -> np.ndarray | None:
    """The rows the filters keep (a boolean mask), None without filters."""
    if not splits and not classes:
        return None
    keep = np.ones(cache.n_rows, bool)
    if splits:
        keep &= np.isin(cache.split, [SPLITS.index(s) for s in splits])
    if classes:
        unknown = [c for c in classes if c not in cache.class_names]
        if unknown:
            known = ", ".join(cache.class_names[:20])
            raise FeatcacheError(f"--class {unknown[0]}: no such class in {cache.path.name} (has {known})")
        idx = [cache.class_names.index(c) for c in classes]
        keep &= cache.labels[:, idx].any(axis=1) if cache.multilabel else np.isin(cache.labels, idx)
    return keep


def _neighbors(cache, sims: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for s, r in zip(sims.tolist(), rows.tolist(), strict=True):
        if r < 0:
            break
        label = (
            [cache.class_names[j] for j in np.flatnonzero(cache.labels[r])]
            if cache.multilabel
            else cache.class_names[int(cache.labels[r])]
        )
        out.append(
            {
                "rank": len(out) + 1,
                "key": cache.keys[r],
                "label": label,
                "split": SPLITS[int(cache.split[r])],
                "similarity": round(float(s), 6),
            }
        )
    return out


def find(
    images: list[str] | None = None,
    *,
    keys: list[str] | None = None,
    texts: list[str] | None = None,
    cfg: Config | str | Path | None = None,
    **options: Any,
) -> FindResult:
    """The ``find.top_k`` cached rows nearest to each query: ``images`` (files or folders), ``keys``
    (cached keys) and ``texts``. ``cfg`` and keywords as every stage takes them
    (:func:`pipeline.utils.config.resolve_config`): ``top_k``, ``split``, ``classes``, ``cluster``, the
    cache selection, and the ``[index]`` settings. An image that cannot be read gets an ``error`` entry."""
    from pipeline.cache.locate import resolve_cache
    from pipeline.cache.store import FeatureCache
    from pipeline.data.images import expand_inputs
    from pipeline.index.search import open_index

    cfg = resolve_config(cfg, "find", **options)
    images, keys, texts = list(images or []), list(keys or []), list(texts or [])
    if not (images or keys or texts):
        raise FeatcacheError("nothing to find: give image files or folders, --key KEY or --text TEXT")
    paths = expand_inputs(images) if images else []
    path = resolve_cache(cfg)
    with FeatureCache(path) as cache:
        layer = cache.layer_name(cfg.train.layer)
        key_rows = _key_rows(cache, keys)
        allowed = _allowed(cache, cfg.find.split, cfg.find.classes)
        text_X = text_features(cache, layer, texts) if texts else None
        index = open_index(cache, layer, cfg.index, progress=cfg.extract.progress)
        result = FindResult(path, layer, index.name)
        k = cfg.find.top_k
        if paths:
            result.queries += _image_queries(cfg, cache, index, paths, allowed)
        if key_rows:
            rows = np.asarray(key_rows)
            sims, found = index.search(index.vectors(rows), k, allowed, exclude=rows)
            for key, s, f in zip(keys, sims, found, strict=True):
                result.queries.append({"query": key, "kind": "key", "neighbors": _neighbors(cache, s, f)})
        if text_X is not None:
            sims, found = index.search(text_X, k, allowed)
            for text, s, f in zip(texts, sims, found, strict=True):
                result.queries.append({"query": text, "kind": "text", "neighbors": _neighbors(cache, s, f)})
    return result


def _image_queries(cfg: Config, cache, index, paths: list[Path], allowed) -> list[dict[str, Any]]:
    from pipeline.data.images import path_dataset
    from pipeline.model.image_features import source_features
    from pipeline.model.rebuild import cache_source

    src = cache_source(cache.path, cache.meta, index.layer)
    ds, samples = path_dataset([p.resolve() for p in paths])
    dim = int(cache.dataset(src.layer).shape[1])
    progress = cfg.extract.progress and len(samples) > 1
    X, ok, why, sources = source_features(
        src, ds, samples, dim, cfg.predict.batch_size, cfg.cluster.address, progress=progress
    )
    if ok.any():
        sims, found = index.search(X[ok], cfg.find.top_k, allowed)
    out, j = [], 0
    for i, p in enumerate(paths):
        q: dict[str, Any] = {"query": str(p), "kind": "image", "features": sources[i], "neighbors": []}
        if ok[i]:
            q["neighbors"] = _neighbors(cache, sims[j], found[j])
            j += 1
        else:
            q.update(features=None, error=why[i] or "cannot read")
        out.append(q)
    return out
