"""Audit a dataset from its cache: likely label errors and near-duplicates, within and across splits.

Reads only the cache (features, labels, splits, keys); no image is opened and no backbone is built.

**Label errors.** Out-of-fold probabilities come from a stratified k-fold over the train + val rows of
standardize + logistic regression on the cached features; test rows are scored by the mean of the k fold
models, none of which saw them. Confident learning (Northcutt et al., JAIR 2021; see
:mod:`pipeline.heads.label_noise`) picks the likely errors and ranks them by self-confidence. The score
is ``1 - p(given label)``: higher is more suspicious.

**Multi-label caches** (a multi-hot matrix): the same protocol one class at a time, as cleanlab's
``multilabel_classification`` does: out-of-fold one-vs-rest probabilities (one binary logistic regression per
class), confident learning on each class's absent/present problem. Each flagged image lists its suspect
labels: *missing* (labelled absent, the model says present) or *extra* (labelled present, the model says
absent), with the class's probability; the image's score is that of its most suspicious label.

**Near-duplicates.** Cosine similarity of the L2-normalized features: exact, by blocked matrix products
(:mod:`pipeline.index.neighbours`), below ``index.exact_below`` rows; above, each row's
``index.audit_neighbours`` nearest from the cache's FAISS index (:mod:`pipeline.index.search`). A pair is reported when its similarity reaches ``exact``, or when
(a) it reaches ``threshold``, (b) the two rows are each other's nearest neighbour and (c) it beats the
second-nearest neighbour of either row by at least ``margin``: a copy is closer to its original than to
anything else, while a natural look-alike (two plain T-shirts) sits in a crowd of neighbours almost as
close. Calibrated on Fashion-MNIST with EfficientNet-Lite0 features (3,000 images, 30 planted copies:
JPEG re-encodes and 2–3× upscaled PNGs; ``benchmarks/bench_audit.py``): planted copies scored 0.90–0.99
and were mutual nearest neighbours in 29 of 30, while natural pairs reached 0.966 at most. A threshold
alone cannot separate them (0.90 admits 1,600 natural pairs, 197 of them mutual nearest neighbours);
mutual + margin 0.02 + 0.85 kept 29 of 30 copies and 81 natural pairs.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.utils.config import SPLITS, Config, resolve_config


@dataclass
class AuditResult:
    """What ``featcache audit`` found; ``to_json()`` is the ``--json`` object."""

    cache: Path
    layer: str
    label_issues: list[dict[str, Any]]
    near_duplicates: list[dict[str, Any]]
    rows: int
    seconds: dict[str, float]
    settings: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    multilabel: bool = False  # label_issues hold suspect labels per image (``suspect``), not ``suggested``

    def to_json(self) -> dict[str, Any]:
        fields = (
            ("key", "given", "suspect", "score")
            if self.multilabel
            else ("key", "given", "suggested", "score")
        )
        return {
            "label_issues": [{k: item[k] for k in fields} for item in self.label_issues],
            "near_duplicates": [
                {k: item[k] for k in ("a", "b", "similarity", "splits")} for item in self.near_duplicates
            ],
        }

    def table(self, top: int = 20) -> str:
        """The terminal report: the ``top`` label issues and near-duplicate pairs."""
        leaks = sum(p["cross_split"] for p in self.near_duplicates)
        lines = [
            f"audit of {self.cache.name}: {self.rows} rows · layer {self.layer} · "
            f"{self.seconds['total']:.1f} s",
            "",
            f"likely label errors: {len(self.label_issues)} "
            + (
                "images with a suspect label (confident learning per class, "
                if self.multilabel
                else "(confident learning, "
            )
            + f"{self.settings['folds']}-fold logistic regression{_fitted_on(self.settings)})",
        ]
        if self.label_issues and self.multilabel:
            lines.append(f"  {'score':>6}  {'split':<5}  {'suspect labels (p)':<40} key")
            for it in self.label_issues[:top]:
                lines.append(
                    f"  {it['score']:>6.3f}  {it['split']:<5}  {suspects_text(it['suspect']):<40} {it['key']}"
                )
        elif self.label_issues:
            lines.append(f"  {'score':>6}  {'split':<5}  {'given':<16} {'suggested':<16} key")
            for it in self.label_issues[:top]:
                lines.append(
                    f"  {it['score']:>6.3f}  {it['split']:<5}  {it['given']:<16.16} {it['suggested']:<16.16} {it['key']}"
                )
        lines += [
            "",
            f"near-duplicate pairs: {len(self.near_duplicates)}, {leaks} across splits "
            f"(mutual nearest neighbours, cosine ≥ {self.settings['threshold']} and ≥ the next neighbour "
            f"+ {self.settings['margin']}; or cosine ≥ {self.settings['exact']}; {_pairs_by(self.settings)})",
        ]
        if self.near_duplicates:
            lines.append(f"  {'cosine':>6}  {'splits':<11} {'leak':<4}  pair")
            for p in self.near_duplicates[:top]:
                splits = "/".join(p["splits"])
                leak = "LEAK" if p["cross_split"] else ""
                lines.append(f"  {p['similarity']:>6.4f}  {splits:<11} {leak:<4}  {p['a']}  ~  {p['b']}")
        more = [
            f"{n - top} more {what}"
            for n, what in ((len(self.label_issues), "label issues"), (len(self.near_duplicates), "pairs"))
            if n > top
        ]
        if more:
            lines.append(f"\n({', '.join(more)}: see --top N or the CSV files)")
        for name, path in self.files.items():
            lines.append(f"{name}: {path}")
        return "\n".join(lines)


def audit(cfg: Config | str | Path | None = None, **options: Any) -> AuditResult:
    """Audit the cache ``cfg`` selects (``train.cache``, else the one ``[data]`` + ``[backbone]`` make), with
    the ``[audit]`` settings (``folds``, ``threshold``, ``margin``, ``exact``, ``filter_by``, ``n_jobs``,
    ``write_csv``); keywords override the config (:func:`pipeline.utils.config.resolve_config`)."""
    from pipeline.cache.locate import resolve_cache
    from pipeline.cache.store import FeatureCache
    from pipeline.index.search import open_index

    cfg = resolve_config(cfg, "audit", **options)
    a = cfg.audit
    t0 = time.perf_counter()
    path = resolve_cache(cfg)
    with FeatureCache(path) as cache:
        multilabel = cache.multilabel
        layer = cache.layer_name(cfg.train.layer)
        labels, split, keys, names = cache.labels, cache.split, cache.keys, cache.class_names
        # all rows in memory only where the exact pass needs them; above, read in blocks as needed
        exact = cache.n_rows < cfg.index.exact_below
        X = cache.features(layer) if exact else (lambda rows: cache.features(layer, rows))
        t_read = time.perf_counter()
        find = _multilabel_issues if multilabel else _label_issues
        issues = find(X, labels, split, keys, names, a, cfg.train.seed)
        t_labels = time.perf_counter()
        index = open_index(
            cache, layer, cfg.index, progress=cfg.extract.progress, features=X if exact else None
        )
        scan = index.scan(min(a.threshold, a.exact), cfg.index.audit_neighbours)
        pairs = _near_duplicates(scan, split, keys, a.threshold, a.margin, a.exact)
    t_pairs = time.perf_counter()
    n_fit = int((split != SPLITS.index("test")).sum())
    result = AuditResult(
        path,
        layer,
        issues,
        pairs,
        len(keys),
        {
            "read": t_read - t0,
            "label_issues": t_labels - t_read,
            "near_duplicates": t_pairs - t_labels,
            "total": t_pairs - t0,
        },
        {
            "folds": a.folds,
            "filter_by": a.filter_by,
            "threshold": a.threshold,
            "margin": a.margin,
            "exact": a.exact,
            "fit_rows": min(a.fit_rows or n_fit, n_fit),
            "fit_of": n_fit,
            "index": index.name,
            "neighbours": cfg.index.audit_neighbours,
        },
        multilabel=multilabel,
    )
    if a.write_csv:
        result.files = write_reports(result)
    return result


def _label_issues(X, labels, split, keys, names, a, seed: int) -> list[dict[str, Any]]:
    """``a``: the ``[audit]`` settings (folds, n_jobs, fit_rows, filter_by)."""
    from pipeline.heads.label_noise import find_label_issues, out_of_fold_proba

    fit_mask = split != SPLITS.index("test")
    proba = out_of_fold_proba(
        X, labels, fit_mask, len(names), folds=a.folds, seed=seed, n_jobs=a.n_jobs, fit_rows=a.fit_rows
    )
    found = find_label_issues(labels, proba, a.filter_by)
    return [
        {
            "key": keys[r],
            "given": names[g],
            "suggested": names[s],
            "score": round(float(sc), 6),
            "split": SPLITS[int(split[r])],
        }
        for r, g, s, sc in zip(found.rows, found.given, found.suggested, found.score, strict=True)
    ]


def _multilabel_issues(X, Y, split, keys, names, a, seed: int) -> list[dict[str, Any]]:
    """One entry per image with a suspect label (cleanlab's per-class reduction), most suspicious first."""
    import numpy as np

    from pipeline.heads.label_noise import find_multilabel_issues, out_of_fold_multilabel_proba

    fit_mask = split != SPLITS.index("test")
    proba = out_of_fold_multilabel_proba(
        X, Y, fit_mask, folds=a.folds, seed=seed, n_jobs=a.n_jobs, fit_rows=a.fit_rows
    )
    found = find_multilabel_issues(Y, proba, a.filter_by)
    by_row: dict[int, list[dict[str, Any]]] = {}
    for r, c, g, p, sc in zip(found.rows, found.classes, found.given, found.proba, found.score, strict=True):
        by_row.setdefault(int(r), []).append(
            {
                "class": names[c],
                "issue": "extra" if g else "missing",
                "probability": round(float(p), 6),
                "score": round(float(sc), 6),
            }
        )
    return [
        {
            "key": keys[r],
            "given": [names[c] for c in np.flatnonzero(Y[r])],
            "suspect": suspects,
            "score": suspects[0]["score"],
            "split": SPLITS[int(split[r])],
        }
        for r, suspects in by_row.items()  # insertion order: by each image's most suspicious label
    ]


def _fitted_on(settings: dict[str, Any]) -> str:
    """`` on a random sample of 50000 of 800000 train+val rows, every row scored`` when ``audit.fit_rows``
    sampled them (a settings dict from before it: nothing)."""
    used, of = settings.get("fit_rows"), settings.get("fit_of")
    if used is None or used >= of:
        return ""
    return f" fitted on a random per-class sample of about {used} of {of} train+val rows (audit.fit_rows), every row scored"


def _pairs_by(settings: dict[str, Any]) -> str:
    if settings.get("index", "exact") == "exact":
        return "exact, all pairs"
    return f"index {settings['index']}, {settings['neighbours']} nearest neighbours a row"


def suspects_text(suspects: list[dict[str, Any]]) -> str:
    """``missing bag (0.93), extra boot (0.04)``: an image's suspect labels and their probabilities."""
    return ", ".join(f"{s['issue']} {s['class']} ({s['probability']:.2f})" for s in suspects)


def _near_duplicates(
    scan, split, keys, threshold: float, margin: float, exact: float
) -> list[dict[str, Any]]:
    """The pairs of ``scan`` (:meth:`pipeline.index.search.CacheIndex.scan`) the audit reports."""
    import numpy as np

    nearest = scan.top_index[:, 0]
    mutual = (nearest[scan.a] == scan.b) & (nearest[scan.b] == scan.a)
    second = np.maximum(scan.top_sim[scan.a, 1], scan.top_sim[scan.b, 1])  # the partner is first
    stands_out = mutual & (scan.similarity >= threshold) & (scan.similarity - second >= margin)
    keep = (scan.similarity >= exact) | stands_out
    out = []
    for a, b, s in zip(scan.a[keep], scan.b[keep], scan.similarity[keep], strict=True):
        sa, sb = SPLITS[int(split[a])], SPLITS[int(split[b])]
        out.append(
            {
                "a": keys[a],
                "b": keys[b],
                "similarity": round(float(s), 6),
                "splits": [sa, sb],
                "cross_split": sa != sb,
            }
        )
    out.sort(key=lambda p: (-p["similarity"], p["a"], p["b"]))
    return out


def _label_issues_csv(result: AuditResult) -> str:
    """Single-label: one row per image. Multi-label: one row per suspect label, ranked by its score, with
    the image's given labels (``;``-separated)."""
    if not result.multilabel:
        return _csv(
            ["rank", "key", "split", "given", "suggested", "score"],
            [
                [i + 1, it["key"], it["split"], it["given"], it["suggested"], it["score"]]
                for i, it in enumerate(result.label_issues)
            ],
        )
    cells = sorted(
        ((s, it) for it in result.label_issues for s in it["suspect"]), key=lambda x: -x[0]["score"]
    )
    return _csv(
        ["rank", "key", "split", "class", "issue", "probability", "score", "given"],
        [
            [
                i + 1,
                it["key"],
                it["split"],
                s["class"],
                s["issue"],
                s["probability"],
                s["score"],
                ";".join(it["given"]),
            ]
            for i, (s, it) in enumerate(cells)
        ],
    )


def write_reports(result: AuditResult) -> dict[str, Path]:
    from pipeline.cache.audit_files import audit_paths
    from pipeline.utils.io import atomic_write

    paths = audit_paths(result.cache)
    atomic_write(paths["label issues"], _label_issues_csv(result))
    atomic_write(
        paths["near-duplicates"],
        _csv(
            ["a", "b", "similarity", "split_a", "split_b", "cross_split"],
            [
                [p["a"], p["b"], p["similarity"], *p["splits"], int(p["cross_split"])]
                for p in result.near_duplicates
            ],
        ),
    )
    return paths


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
