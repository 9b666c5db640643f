"""Choose the backbone on your own data: candidates extracted once each, scored by one linear probe.

    candidates (``--backbones a,b`` or ``[[candidate]]`` tables) → every one checked (its cache path and,
    when it has work to do, its model built and timed on a short probe) → each extracted through the normal
    cache with that model (built once), one progress bar across all → :mod:`pipeline.tuning.probe` scores
    each cached layer → the leaderboard, best first by val accuracy (val macro mAP on a multi-label cache),
    in ``<cache_dir>/compare-<id>/``; the best cache becomes the newest

Each finished candidate is appended to ``compare.jsonl`` at once, so a killed compare rerun with the same
candidates lands in the same folder and does no backbone work for what is done. Extraction is the
``extract`` stage's; stages never import each other, so the entry point hands it in (``extractor``,
:func:`pipeline.api.compare`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.utils.config import Config, read_toml, resolve_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, file_lock
from pipeline.utils.journal import append_trial, read_trials

JOURNAL = "compare.jsonl"
#: what the rows of a compare folder mean; a new protocol gets a new folder
PROTOCOL = "l2-logistic-cval-1"
COLUMNS = (
    "rank",
    "label",
    "backbone",
    "layer",
    "image_size",
    "pooling",
    "weights",
    "val_accuracy",
    "test_accuracy",
    "macro_f1",
    "mean_recall",
    "C",
    "dim",
    "images_per_second",
    "cpu_seconds",
    "extract_seconds",
    "extracted",
    "reused",
    "cpu_seconds_per_image",
    "cache_bytes",
    "cache",
)
#: a multi-label cache's rows also hold these (after ``test_accuracy``); they rank by ``val_map``
MULTILABEL_COLUMNS = ("val_map", "test_map", "micro_map")
#: a text tower's candidates also hold the zero-shot scores (:func:`pipeline.tuning.probe.zero_shot`)
TEXT_COLUMNS = ("zeroshot_val", "zeroshot_test", "zeroshot_mean_recall")


def columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """:data:`COLUMNS`, with :data:`MULTILABEL_COLUMNS` when the rows are a multi-label cache's and
    :data:`TEXT_COLUMNS` when a candidate has a text tower."""
    at = COLUMNS.index("test_accuracy") + 1
    extra = MULTILABEL_COLUMNS if any("val_map" in r for r in rows) else ()
    extra += TEXT_COLUMNS if any(r.get("zeroshot_test") is not None for r in rows) else ()
    return COLUMNS[:at] + extra + COLUMNS[at:]


@dataclass
class Candidate:
    """One backbone setting to compare: its label, its full config, and what the check found."""

    label: str
    cfg: Config
    cache: Path | None = None
    pending: int = 0  # images its extraction still has to run through the backbone
    estimate: float | None = None  # seconds, from the probe
    model: Any = None  # the probe's FeatureModel, kept for the extraction (not built twice)

    @property
    def key(self) -> str:
        return f"{self.label}|{self.cache.name if self.cache else ''}"


@dataclass
class CompareResult:
    dir: Path
    rows: list[dict[str, Any]]
    extracted: int = 0  # images run through a backbone by this call
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    journaled: list[str] = field(default_factory=list)  # candidates scored by an earlier call (compare.jsonl)

    @property
    def best(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None

    def to_json(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "candidates": self.rows}

    def summary(self) -> str:
        return (
            format_leaderboard(self.rows)
            + "\n\n"
            + self.work_line()
            + f"\nleaderboard: {self.dir / 'leaderboard.csv'}"
            + (
                f"\nbest: {self.best['label']} (cache {self.best['cache']}, now the newest)"
                if self.best
                else ""
            )
        )

    def work_line(self) -> str:
        """What each candidate ran through its backbone: extracted by the call that scored it, or reused."""
        seen: dict[str, str] = {}
        for r in self.rows:
            if r["label"] in self.journaled:
                seen[r["label"]] = "scored before (compare.jsonl)"
            elif r.get("extracted") is not None:
                seen[r["label"]] = f"{r['extracted']} extracted, {r.get('reused') or 0} reused from its cache"
        parts = "; ".join(f"{k}: {v}" for k, v in seen.items())
        return f"images this call: {self.extracted} through a backbone ({parts})"


def _default_label(table: dict[str, Any]) -> str:
    label = str(table.get("name", "?"))
    if table.get("image_size"):
        label += f"@{table['image_size']}"
    if table.get("layers"):
        layers = table["layers"]
        label += ":" + ("+".join(layers) if isinstance(layers, list) else str(layers))
    if table.get("weights") not in (None, "imagenet"):
        label += f"/{Path(str(table['weights'])).name}"
    return label


def candidate_tables(cfg: Config) -> list[dict[str, Any]]:
    """The candidates as ``[backbone]`` tables (with ``label``): ``compare.backbones``, then the file."""
    tables: list[dict[str, Any]] = [{"name": name} for name in cfg.compare.backbones]
    if cfg.compare.candidates:
        path = Path(cfg.compare.candidates).expanduser()
        raw = read_toml(path, "candidates file")
        extra = set(raw) - {"candidate"}
        items = raw.get("candidate", [])
        if extra or not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
            raise FeatcacheError(f"{path}: expected only [[candidate]] tables (found {', '.join(extra)})")
        tables += [dict(t) for t in items]
    if not tables:
        raise FeatcacheError("compare: no candidates: give --backbones a,b,... or --candidates FILE.toml")
    return tables


def make_candidates(cfg: Config) -> list[Candidate]:
    """Every candidate's config: ``[backbone]`` with the candidate's keys on top (its layers name one
    backbone's layers, so they are never inherited). A bad key or value names the candidate."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for i, table in enumerate(candidate_tables(cfg), 1):
        table = dict(table)
        table.setdefault("name", cfg.backbone.name)
        label = str(table.pop("label", "") or _default_label(table))
        if label in seen:
            label = f"{label}#{i}"
        seen.add(label)
        keys = {"backbone__layers": [], **{f"backbone__{k}": v for k, v in table.items()}}
        try:
            out.append(Candidate(label, resolve_config(cfg, "extract", **keys)))
        except FeatcacheError as e:
            raise FeatcacheError(f"compare: candidate {label}: {e}") from None
    return out


#: the probes' models are kept for their extractions while their weights total at most this; past it, a
#: model is dropped after its probe and the extraction builds it again
KEEP_MODEL_BYTES = 1 << 30


def _check(c: Candidate, probe_images: int, ds) -> None:
    """``c``'s cache path and pending images; with work to do, its model built (layers, weights) and timed."""
    from pipeline.cache.locate import resolve_cache_path
    from pipeline.cache.quarantine import quarantine_path, read_quarantine
    from pipeline.cache.store import FeatureCache
    from pipeline.features.backbones.hub_presets import settle
    from pipeline.features.backbones.registry import check_engine, get_spec
    from pipeline.utils.config import given_keys

    spec = get_spec(c.cfg.backbone.name)
    check_engine(spec, c.cfg.extract.engine)  # a quantized engine refused for this backbone: named up front
    if spec.preset is not None:
        settle(c.cfg.backbone, given_keys(c.cfg), spec.preset)
    c.cache, _, _ = resolve_cache_path(c.cfg, ds)
    n = len(ds.samples)
    cached = len(read_quarantine(quarantine_path(c.cache)))  # unreadable before: not decoded again
    if c.cache.exists():
        with FeatureCache(c.cache) as cache:
            cached += cache.n_rows
    c.pending = max(0, n - cached)
    if c.pending:
        c.estimate = _probe(c, probe_images)


def _probe(c: Candidate, images: int) -> float | None:
    """Build ``c``'s model (a missing layer or unavailable weights fail here) and time ``images`` images."""
    import numpy as np

    from pipeline.features.backbones.build import build_feature_model

    fm = build_feature_model(c.cfg.backbone, c.cfg.extract.precision)
    if not c.cfg.cluster.address:  # a cluster's workers build their own
        c.model = fm
    if not images:
        return None
    x = np.random.default_rng(0).uniform(0, 255, (images, fm.image_size, fm.image_size, 3))
    x = x.astype("float32")
    fm.model(x[:1], training=False)  # the first call traces the graph
    t0 = time.perf_counter()
    fm.model(x, training=False)
    return (time.perf_counter() - t0) / images * c.pending


def check_candidates(cands: list[Candidate], probe_images: int, ds) -> None:
    """Check every candidate before any extraction; all the bad ones in one line. A candidate whose cache is
    complete builds no model: its cache proves its settings. ``ds``: the dataset they share (listed once)."""
    bad, kept = [], 0
    for c in cands:
        try:
            _check(c, probe_images, ds)
        except FeatcacheError as e:
            bad.append(f"{c.label}: {e}")
        if c.model is not None:
            kept += 4 * int(c.model.base.count_params())  # float32 weights
            if bad or kept > KEEP_MODEL_BYTES:
                c.model = None
    if bad:
        raise FeatcacheError(f"compare: {len(bad)} bad candidate(s), nothing extracted: " + "; ".join(bad))


def compare_id(cands: list[Candidate], cfg: Config, n_images: int) -> str:
    """The compare folder's name: its candidates, their caches, the images listed (more images: a new
    compare, which extracts only the new ones) and the protocol's settings."""
    ident = {
        "candidates": [c.key for c in cands],
        "images": n_images,
        "shots": cfg.compare.shots,
        "seeds": cfg.compare.seeds,
        "protocol": PROTOCOL,
    }
    if any(c.cfg.backbone.pooling == "pooled" for c in cands):  # a text tower's candidates: its prompts
        ident["zeroshot"] = dataclasses.asdict(cfg.zeroshot)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def compare(
    config: Config | str | Path | None = None,
    *,
    extractor: Callable[..., Any],
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> CompareResult:
    """Extract (or reuse) and score every candidate of ``config`` (keywords on top,
    :func:`pipeline.utils.config.resolve_config`); ``extractor`` is the extract stage."""
    t0 = time.perf_counter()
    cfg = resolve_config(config, "compare", **options)
    if progress is None and cfg.extract.progress:
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cands = make_candidates(cfg)
    from pipeline.data.sources import load_dataset

    # the candidates differ in [backbone] only: their dataset is listed once, not twice per candidate
    ds = load_dataset(cands[0].cfg.data, Path(cands[0].cfg.extract.cache_dir) / "shards")
    try:
        return _compare(cfg, cands, ds, extractor, progress, t0)
    finally:
        ds.close()


def _compare(cfg: Config, cands: list[Candidate], ds, extractor, progress, t0: float) -> CompareResult:
    check_candidates(cands, cfg.compare.probe_images, ds)
    out = Path(cfg.extract.cache_dir) / f"compare-{compare_id(cands, cfg, len(ds.samples))}"
    out.mkdir(parents=True, exist_ok=True)
    result = CompareResult(out, [])
    busy = f"{out}: another featcache compare is running these candidates; wait for it"
    with file_lock(out / "compare.lock", busy):
        records = read_trials(out / JOURNAL)
        todo = [c for c in cands if not (c.key in records and c.cache.exists())]
        result.journaled = [c.label for c in cands if c not in todo]
        with _bar(cfg, sum(c.pending for c in todo)) as bar:
            for c in todo:
                records[c.key] = _run_candidate(c, cfg, extractor, bar, progress, result, ds)
                append_trial(out / JOURNAL, records[c.key])
        result.rows = leaderboard([records[c.key] for c in cands])
        write_leaderboard(out, result.rows)
    if result.best:
        from pipeline.cache.locate import touch_cache

        touch_cache(Path(result.best["cache"]))  # train and search continue on the winner
    result.seconds = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def _bar(cfg: Config, total: int):
    """One progress bar over every candidate's extraction."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="compare", disable=not cfg.extract.progress, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _run_candidate(c: Candidate, cfg: Config, extractor, bar, progress, result: CompareResult, ds) -> dict:
    """Extract ``c`` through the normal cache (timed), then score each of its layers."""
    from pipeline.cache.store import FeatureCache
    from pipeline.heads.zeroshot import joint_space_text
    from pipeline.tuning.probe import score_layer

    if progress:
        when = f", estimated {c.estimate:.0f} s" if c.estimate is not None else ""
        progress(f"compare: {c.label}: {c.pending} images to extract{when}")
    cpu0 = time.process_time()
    model, c.model = c.model, None  # the extraction's now: freed with it
    done = extractor(c.cfg, dataset=ds, progress_bar=bar, feature_model=model)
    del model
    cpu = time.process_time() - cpu0
    result.extracted += done.extracted
    extract = {
        "extracted": done.extracted,
        "reused": done.reused,
        "images_per_second": done.images_per_second if done.extracted else None,
        "cpu_seconds": cpu,
        # the call's CPU time over the images it extracted: a reused cache is not cheap, it is "cached"
        "cpu_seconds_per_image": cpu / done.extracted if done.extracted else None,
        "extract_seconds": done.seconds,
        "estimate_seconds": c.estimate,
        "cache_bytes": Path(done.path).stat().st_size,
    }
    b = c.cfg.backbone
    with FeatureCache(done.path) as cache:
        text = None if cache.multilabel else joint_space_text(c.cfg, cache)  # zero-shot rows too
        try:
            layers = {
                layer: score_layer(cache, layer, cfg.compare.shots, cfg.compare.seeds, text)
                for layer in cache.layers
            }
        except ValueError as e:
            raise FeatcacheError(f"compare: {c.label}: cannot probe {done.path.name}: {e}") from None
    settings = {
        "backbone": b.name,
        "image_size": b.image_size or None,
        "pooling": b.pooling,
        "weights": b.weights,
    }
    return {"key": c.key, "label": c.label, "cache": str(done.path), **settings, **extract, "layers": layers}


def leaderboard(records: list[dict]) -> list[dict[str, Any]]:
    """One row per candidate and layer, best first by val accuracy, or by val macro mAP for a multi-label
    cache (a tie keeps the candidates' order)."""
    rows = []
    for rec in records:
        for layer, scores in rec["layers"].items():
            rows.append(
                {k: v for k, v in rec.items() if k not in ("key", "layers")} | {"layer": layer} | scores
            )
    rows.sort(key=lambda r: -(r["val_map"] if "val_map" in r else r["val_accuracy"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    cols = columns(rows)
    return [
        {k: r.get(k) for k in cols} | {k: r[k] for k in ("shots", "fewshot_shots") if k in r} for r in rows
    ]


def write_leaderboard(out: Path, rows: list[dict[str, Any]]) -> None:
    """``leaderboard.csv`` (k-shot as ``shot_K_mean``/``shot_K_std`` columns; a multi-label cache's k-shot
    scores are test macro mAP) and ``leaderboard.json``."""
    import csv
    import io

    shots = sorted({k for r in rows for k in r["shots"]}, key=int)
    cols = columns(rows)
    few = [k for k in shots if any(k in (r.get("fewshot_shots") or {}) for r in rows)]
    header = [*cols, *(f"shot_{k}_{m}" for k in shots for m in ("mean", "std"))]
    header += [f"fewshot_{k}_{m}" for k in few for m in ("mean", "std")]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        kshot = [r["shots"].get(k, {}).get(m) for k in shots for m in ("mean", "std")]
        kshot += [(r.get("fewshot_shots") or {}).get(k, {}).get(m) for k in few for m in ("mean", "std")]
        w.writerow([r[k] for k in cols] + kshot)
    with atomic_path(out / "leaderboard.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    with atomic_path(out / "leaderboard.json") as tmp:
        tmp.write_text(json.dumps({"candidates": rows}, indent=2), encoding="utf-8")


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_leaderboard(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as a text table (a multi-label cache's: val/test macro mAP and test micro mAP)."""
    shots = sorted({k for r in rows for k in r["shots"]}, key=int)
    multilabel, text = "val_map" in columns(rows), "zeroshot_test" in columns(rows)
    scores = ("val_map", "test_map", "micro_map") if multilabel else ("val_accuracy", "test_accuracy")
    names = ("val mAP", "test mAP", "µmAP") if multilabel else ("val", "test")
    head = f"{'#':>2} {'candidate':<28} {'layer':<22}" + "".join(f" {n:>{max(6, len(n))}}" for n in names)
    head += f" {'mF1':>6} {'dim':>6} {'extracted':>9} {'img/s':>7}"
    head += f" {'CPU s/img':>9} {'cache':>9}" + "".join(f" {k + '-shot':>12}" for k in shots)
    head += (f" {'0-shot':>6}" + "".join(f" {k + '-shot fs':>12}" for k in shots)) if text else ""
    lines = [head]
    for r in rows:
        ips = f"{r['images_per_second']:.1f}" if r["images_per_second"] else "-"
        per = r.get("cpu_seconds_per_image")
        cost = f"{per:.3f}" if per else "cached" if r.get("extracted") == 0 else "-"
        line = f"{r['rank']:>2} {r['label'][:28]:<28} {r['layer'][:22]:<22}"
        line += "".join(f" {r[k]:>{max(6, len(n))}.3f}" for k, n in zip(scores, names, strict=True))
        line += f" {r['macro_f1']:>6.3f} {r['dim']:>6} {str(r.get('extracted', '-')):>9} {ips:>7}"
        line += f" {cost:>9} {_size(r['cache_bytes']):>9}"
        line += "".join(f" {r['shots'][k]['mean']:>6.3f}±{r['shots'][k]['std']:.3f}" for k in shots)
        if text:
            fs = r.get("fewshot_shots") or {}
            line += f" {r['zeroshot_test']:>6.3f}" if r.get("zeroshot_test") is not None else f" {'-':>6}"
            line += "".join(
                f" {fs[k]['mean']:>6.3f}±{fs[k]['std']:.3f}" if k in fs else f" {'-':>12}" for k in shots
            )
        lines.append(line)
    return "\n".join(lines)
