"""``featcache report``: one self-contained HTML page about a cache and every run made from it.

    cache (dataset, backbone, rows per split and class, quarantined files)
    leaderboard of train runs, fine-tuned runs and search trials (sortable: click a column header)
    for the best run on val (and ``--run``): per-class precision/recall/F1, confusion matrices,
        learning curves, thumbnails of the most confidently wrong test images
    the audit's findings when ``featcache audit`` wrote them beside the cache: suspected label errors with
        thumbnails, near-duplicate pairs across splits (leaks); a note when there is no audit
    the leaderboard of the newest ``featcache compare`` beside the cache that compared it (or ``--compare``),
        with test accuracy (macro mAP, multi-label) against extraction cost
    a 2-D map of the cached features (PCA of a random sample of ``report.map_rows`` rows, 2,000; t-SNE of
        ``report.tsne_rows`` of them, 500), coloured by class: whatever the cache's size, only the sample is read

A multi-label cache gets the same page measured as multi-label (:mod:`.multilabel`): mAP in the
leaderboard, per-class AP and thresholds, precision-recall curves, the test images with the most wrong labels.
The sections live in :mod:`.sections` (single-label), :mod:`.multilabel` and :mod:`.comparison`; the HTML
pieces in :mod:`.html`.

The page loads nothing: pictures are PNG ``data:`` URIs, and the CSS and the few lines of JavaScript
(``report/assets/``, package data) are inlined, so it can be mailed or archived as one file. Plots are
drawn by :mod:`pipeline.utils.plots`; thumbnails are read through the same image pipeline extraction used
(:func:`pipeline.data.images.image_batches`), so they show what the backbone saw.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache.locate import no_runs_error, resolve_run, runs_root, select_cache
from pipeline.cache.state import cache_state
from pipeline.stages.report.comparison import compare_section, find_compare
from pipeline.stages.report.findings import audit_section
from pipeline.stages.report.html import page
from pipeline.stages.report.multilabel import (
    COLUMNS as MULTILABEL_COLUMNS,
)
from pipeline.stages.report.multilabel import (
    best_multilabel,
    multilabel_board,
    multilabel_run_section,
    test_scores,
)
from pipeline.stages.report.sections import (
    cache_section,
    feature_map,
    header,
    leaderboard,
    map_section,
    run_section,
)
from pipeline.utils.config import Config, resolve_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import METRICS, best_run, list_runs, read_metrics, search_trials
from pipeline.utils.staleness import ranked


@dataclass
class Report:
    """What ``featcache report`` wrote: the page, and what it shows."""

    path: Path
    cache: Path
    runs: list[dict[str, Any]]  # every leaderboard row: runs, fine-tuned runs, search trials
    detailed: list[str]  # ids of the runs shown in detail
    best: str | None
    thumbnails: int
    map_rows: tuple[int, int]  # rows in the PCA map, rows in the t-SNE map (a sample of map_of)
    seconds: float
    notes: list[str] = field(default_factory=list)
    audit: str = ""  # what the audit section shows, in words
    map_of: int = 0  # the cache's rows the map's sample was drawn from

    def summary(self) -> str:
        kinds = [r["kind"] for r in self.runs]
        lines = [
            f"report: {self.path} ({self.path.stat().st_size / 1024:.0f} KB, {self.seconds:.1f} s)",
            f"runs: {kinds.count('train')} train, {kinds.count('finetune')} fine-tuned,"
            f" {kinds.count('trial')} search trials · best on val: {self.best or '-'}",
            f"detailed: {', '.join(self.detailed) or '-'} · {self.thumbnails} misclassified thumbnails"
            f" · feature map: PCA {self.map_rows[0]} rows, t-SNE {self.map_rows[1]} rows"
            + (f" (a random sample of the {self.map_of})" if 0 < self.map_rows[0] < self.map_of else ""),
        ]
        lines.append(f"audit: {self.audit}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"open: {self.path.resolve().as_uri()}")
        return "\n".join(lines)


def report(cfg: Config | str | Path | None = None, **options: Any) -> Report:
    """Write the HTML report of ``cfg``'s cache (``report.out``, default ``<cache>.report.html`` beside it),
    detailing the best run and ``report.run``; keywords (``out``, ``run``, ``thumbnails``, ``map_rows``,
    ``tsne_rows``, ``compare``, ...) override ``cfg`` as in every stage (:func:`pipeline.utils.config.resolve_config`)."""
    from pipeline.cache.store import FeatureCache
    from pipeline.data.augment import view_mask
    from pipeline.utils.io import atomic_write

    cfg = resolve_config(cfg, "report", **options)
    r = cfg.report
    t0 = time.perf_counter()
    choice = select_cache(cfg)
    cache_path = choice.path
    root = runs_root(cfg, cache_path)
    out = Path(r.out) if r.out else cache_path.with_name(cache_path.stem + ".report.html")
    if out.is_dir():
        raise FeatcacheError(f"--out {out} is a folder; give a file name, e.g. {out / 'report.html'}")
    say = _progress(cfg)
    compared = find_compare(cache_path, r.compare)
    notes: list[str] = list(compared.notes)
    with FeatureCache(cache_path) as cache:
        multilabel = cache.multilabel
        rows = list_runs(root, cache.fingerprint, cache=cache_path, state=cache_state(cache))
        if not rows and compared.folder is None:  # nothing to report on: never an empty page, exit 0
            raise no_runs_error(cfg, choice, finetuned=False)
        board = _board(rows)
        stale = sum(not ranked(r) for r in board)
        if stale:
            notes.append(
                f"{stale} leaderboard rows were scored on an older state of the cache (val/test rows changed"
                " since): shown apart as stale, not ranked"
            )
        if multilabel:
            board = multilabel_board(board)
        best = best_multilabel(board) if multilabel else best_run(rows)
        detail = _detail_dirs(cfg, r.run, best)
        layer = cache.layer_name(_run_layer(detail[0]) if detail else None)
        say(f"report: {len(board)} leaderboard rows; mapping features of {layer}")
        fmap, n_map = feature_map(cache, layer, r.map_rows, r.tsne_rows)
        n_rows = int((~view_mask(cache.keys)).sum())  # the rows the map samples: no augmented views
        meta = dict(cache.meta)
        sections = [header(cache, cache_path, root), cache_section(cache, cache_path)]
        scores = {d: test_scores(d, cache) for d in detail} if multilabel else {}
        keys = list(cache.keys) if multilabel else []
    columns = {"columns": MULTILABEL_COLUMNS, "metric": "val macro mAP"} if multilabel else {}
    sections.append(leaderboard(board, best["id"] if best else None, **columns))
    shown = 0
    for d in detail:
        say(f"report: details of {d.name}")
        is_best = best is not None and d.name == best["id"]
        if multilabel:
            html_, n = multilabel_run_section(d, scores[d], keys, meta, r.thumbnails, notes, is_best)
        else:
            html_, n = run_section(d, meta, r.thumbnails, notes, is_best)
        sections.append(html_)
        shown += n
    audit_html, found = audit_section(cache_path, meta, notes)
    sections.append(audit_html)
    if compared.folder is not None or compared.notes:
        sections.append(compare_section(compared, cache_path))
    sections.append(map_section(fmap, layer, n_map, n_rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, page(f"featcache report · {cache_path.stem}", sections))
    return Report(
        out, cache_path, board, [d.name for d in detail], best["id"] if best else None, shown, n_map,
        time.perf_counter() - t0, notes, _audit_words(found), n_rows,
    )  # fmt: skip


def _audit_words(found) -> str:
    if found is None:
        return "none beside the cache (`featcache audit` finds label errors and leaks)"
    return f"{len(found.label_issues)} likely label errors · {len(found.leaks)} near-duplicate pairs across splits"


def _progress(cfg: Config):
    if not cfg.extract.progress:
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _board(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs and fine-tuned runs, then every trial of every search (the search rows themselves are summaries)."""
    board = [r for r in rows if r["kind"] != "search"]
    for r in rows:
        if r["kind"] == "search":  # its trials were scored on the data the search was
            board += [{**t, "state": r["state"], "val_n": r["val_n"]} for t in search_trials(Path(r["path"]))]
    return board


def _detail_dirs(cfg: Config, run: str | None, best: dict[str, Any] | None) -> list[Path]:
    out = [Path(best["path"])] if best else []
    if run:
        chosen = resolve_run(cfg, run)
        if chosen.name.startswith("search-"):
            raise FeatcacheError(
                f"--run {run}: a search has no test predictions; pick a train or fine-tuned run (`featcache runs ls`)"
            )
        if not (chosen / METRICS).is_file():
            raise FeatcacheError(f"--run {run}: {chosen} has no metrics.json (an unfinished run?)")
        out = [chosen] + [d for d in out if d.resolve() != chosen.resolve()]
    return out


def _run_layer(run_dir: Path) -> str | None:
    return read_metrics(run_dir, missing_ok=True).layer
