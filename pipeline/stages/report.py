"""``featcache report``: one self-contained HTML page about a cache and every run made from it.

    cache (dataset, backbone, rows per split and class, quarantined files)
    leaderboard of train runs, fine-tuned runs and search trials (sortable: click a column header)
    for the best run on val (and ``--run``): per-class precision/recall/F1, confusion matrices,
        learning curves, thumbnails of the most confidently wrong test images
    a 2-D map of the cached features (PCA; t-SNE on a sample), coloured by class

The page loads nothing: pictures are PNG ``data:`` URIs, and the CSS and the few lines of JavaScript
(``report_assets/``, package data) are inlined, so it can be mailed or archived as one file. Plots are
drawn by :mod:`pipeline.utils.plots`; thumbnails are read through the same image pipeline extraction used
(:func:`pipeline.data.images.image_batches`), so they show what the backbone saw.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.locate import resolve_cache, resolve_run, runs_root
from pipeline.utils.config import SPLITS, Config, resolve_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import METRICS, best_run, list_runs, read_metrics, search_trials

#: The page's style sheet and script, package data read by :func:`_asset`. A click on a header sorts its
#: table (numbers high→low first, text a→z; again to reverse; blanks last); ``report.html#sort=KEY`` clicks
#: the header whose data-key is KEY once loaded: how the tests drive it.
ASSETS = "report_assets"


def _asset(name: str) -> str:
    from importlib.resources import files

    return files("pipeline.stages").joinpath(ASSETS).joinpath(name).read_text(encoding="utf-8")


@dataclass
class Report:
    """What ``featcache report`` wrote: the page, and what it shows."""

    path: Path
    cache: Path
    runs: list[dict[str, Any]]  # every leaderboard row: runs, fine-tuned runs, search trials
    detailed: list[str]  # ids of the runs shown in detail
    best: str | None
    thumbnails: int
    map_rows: tuple[int, int]  # rows in the PCA map, rows in the t-SNE map
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = [r["kind"] for r in self.runs]
        lines = [
            f"report: {self.path} ({self.path.stat().st_size / 1024:.0f} KB, {self.seconds:.1f} s)",
            f"runs: {kinds.count('train')} train, {kinds.count('finetune')} fine-tuned,"
            f" {kinds.count('trial')} search trials · best on val: {self.best or '-'}",
            f"detailed: {', '.join(self.detailed) or '-'} · {self.thumbnails} misclassified thumbnails"
            f" · feature map: PCA {self.map_rows[0]} rows, t-SNE {self.map_rows[1]} rows",
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"open: {self.path.resolve().as_uri()}")
        return "\n".join(lines)


def report(cfg: Config | str | Path | None = None, **options: Any) -> Report:
    """Write the HTML report of ``cfg``'s cache (``report.out``, default ``<cache>.report.html`` beside it),
    detailing the best run and ``report.run``; keywords (``out``, ``run``, ``thumbnails``, ``map_rows``,
    ``tsne_rows``, ...) override ``cfg`` as in every stage (:func:`pipeline.utils.config.resolve_config`)."""
    from pipeline.cache.store import FeatureCache
    from pipeline.utils.io import atomic_write

    cfg = resolve_config(cfg, "report", **options)
    r = cfg.report
    t0 = time.perf_counter()
    cache_path = resolve_cache(cfg)
    root = runs_root(cfg, cache_path)
    out = Path(r.out) if r.out else cache_path.with_name(cache_path.stem + ".report.html")
    if out.is_dir():
        raise FeatcacheError(f"--out {out} is a folder; give a file name, e.g. {out / 'report.html'}")
    say = _progress(cfg)
    notes: list[str] = []
    with FeatureCache(cache_path) as cache:
        if cache.multilabel:
            from pipeline.heads.multilabel import refuse_multilabel

            refuse_multilabel("report", f"the cache {Path(cache_path).name}")
        rows = list_runs(root, cache.fingerprint)
        board = _board(rows)
        best = best_run(rows)
        detail = _detail_dirs(cfg, r.run, best)
        layer = cache.layer_name(_run_layer(detail[0]) if detail else None)
        say(f"report: {len(board)} leaderboard rows; mapping features of {layer}")
        fmap, n_map = _feature_map(cache, layer, r.map_rows, r.tsne_rows)
        meta = dict(cache.meta)
        sections = [_header(cache, cache_path, root), _cache_section(cache, cache_path)]
    sections.append(_leaderboard(board, best["id"] if best else None))
    shown = 0
    for d in detail:
        say(f"report: details of {d.name}")
        html_, n = _run_section(d, meta, r.thumbnails, notes, best is not None and d.name == best["id"])
        sections.append(html_)
        shown += n
    sections.append(_map_section(fmap, layer, n_map))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, _page(f"featcache report · {cache_path.stem}", sections))
    return Report(
        out, cache_path, board, [d.name for d in detail], best["id"] if best else None, shown, n_map,
        time.perf_counter() - t0, notes,
    )  # fmt: skip


def _progress(cfg: Config):
    if not cfg.extract.progress:
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _board(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs and fine-tuned runs, then every trial of every search (the search rows themselves are summaries)."""
    board = [r for r in rows if r["kind"] != "search"]
    for r in rows:
        if r["kind"] == "search":
            board += search_trials(Path(r["path"]))
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


# -- small HTML helpers ---------------------------------------------------------------------------------


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{escape(alt)}" src="{_png_uri(data)}">'


def _plot(draw, *args) -> bytes:
    buf = io.BytesIO()
    draw(buf, *args)
    return buf.getvalue()


def _num(v: Any, digits: int = 4) -> str:
    """A numeric cell: the shown value, and the raw one in ``data-v`` for sorting (blank when missing)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return '<td class="n" data-v="">-</td>'
    shown = f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    return f'<td class="n" data-v="{float(v)!r}">{shown}</td>'


def _dl(items: list[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items) + "</dl>"


def _page(title: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>\n{_asset('report.css')}</style></head>\n<body>\n"
        + "\n".join(sections)
        + f"\n<script>\n{_asset('report.js')}</script>\n</body></html>\n"
    )


# -- the cache -----------------------------------------------------------------------------------------


def _header(cache, cache_path: Path, root: Path) -> str:
    return (
        f"<h1>featcache report · {escape(str(cache.meta.get('dataset', '?')))}</h1>"
        f'<p class="sub">cache <code>{escape(str(cache_path))}</code> · runs <code>{escape(str(root))}</code>'
        f" · written {escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"
    )


def _cache_section(cache, cache_path: Path) -> str:
    from pipeline.data.augment import is_view_key

    m = cache.meta
    dims = ", ".join(f"{layer} ({int(np.prod(cache.dataset(layer).shape[1:]))})" for layer in cache.layers)
    views = sum(1 for k in cache.keys if is_view_key(k))
    info = [
        ("dataset", m.get("dataset")),
        ("source", m.get("source")),
        ("backbone", f"{m.get('backbone')} · weights {m.get('weights')} · preprocess {m.get('preprocess')}"),
        ("layers (dims)", dims),
        ("input", f"{m.get('image_size')} px · resize {m.get('resize')} · pooling {m.get('pooling')}"),
        (
            "storage",
            f"{m.get('dtype')} · engine {m.get('engine')} · {cache_path.stat().st_size / 2**20:.1f} MB",
        ),
        ("rows", f"{cache.n_rows}" + (f" ({views} augmented views)" if views else "")),
        ("fingerprint", cache.fingerprint),
        ("created", m.get("created")),
    ]
    head = "".join(f'<th data-type="num">{s}</th>' for s in SPLITS)
    body = []
    for i, name in enumerate(cache.class_names):
        counts = [int(((cache.labels == i) & (cache.split == j)).sum()) for j in range(len(SPLITS))]
        body.append(f"<tr><td>{escape(name)}</td>" + "".join(_num(c) for c in counts) + _num(sum(counts)))
    totals = [int((cache.split == j).sum()) for j in range(len(SPLITS))]
    foot = (
        "<tr><th>all</th>"
        + "".join(f'<th class="n">{c}</th>' for c in totals)
        + f'<th class="n">{sum(totals)}</th>'
    )
    table = (
        f'<table class="sortable"><thead><tr><th data-key="class">class</th>{head}'
        f'<th data-type="num">total</th></tr></thead><tbody>{"".join(body)}</tbody><tfoot>{foot}</tfoot></table>'
    )
    return f"<h2>Cache</h2>{_dl(info)}<h3>Rows per split and class</h3>{table}{_skipped(cache_path)}"


def _skipped(cache_path: Path, limit: int = 200) -> str:
    """The quarantine list beside the cache: files extraction could not read, and why."""
    from pipeline.cache.quarantine import quarantine_path

    path = quarantine_path(cache_path)
    if not path.is_file():
        return "<h3>Skipped files</h3><p>none: every file of the dataset was read.</p>"
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("key")]
    body = "".join(
        f"<tr><td><code>{escape(r['key'])}</code></td><td>{escape(r.get('reason') or '')}</td></tr>"
        for r in rows[:limit]
    )
    more = (
        f"<p>... and {len(rows) - limit} more in <code>{escape(str(path))}</code></p>"
        if len(rows) > limit
        else ""
    )
    return (
        f'<h3>Skipped files ({len(rows)})</h3><p class="sub">from <code>{escape(str(path))}</code></p>'
        f'<div class="scroll"><table><thead><tr><th>file</th><th>why</th></tr></thead><tbody>{body}</tbody></table></div>{more}'
    )


# -- the leaderboard -----------------------------------------------------------------------------------

_COLUMNS = (
    ("id", "run", "text"),
    ("kind", "kind", "text"),
    ("head", "head", "text"),
    ("params", "params", "text"),
    ("transforms", "transforms", "text"),
    ("layer", "layer", "text"),
    ("val_accuracy", "val acc", "num"),
    ("val_macro_f1", "val macro-F1", "num"),
    ("test_accuracy", "test acc", "num"),
    ("test_macro_f1", "test macro-F1", "num"),
    ("resource", "rows", "num"),
    ("seconds", "time (s)", "num"),
    ("created", "created", "text"),
)


def _board_row(r: dict[str, Any], best_id: str | None) -> str:
    cls = "best" if r["id"] == best_id else "failed" if r.get("status") not in (None, "ok") else ""
    cells = []
    for key, _, kind in _COLUMNS:
        v = r.get(key)
        if key == "params":
            v = json.dumps(v, sort_keys=True) if v else "{}"
        if key == "resource" and v is None:
            v = 1.0
        if key == "val_accuracy" and r.get("status") not in (None, "ok"):
            cells.append(f'<td class="n" data-v="" title="{escape(r.get("error") or "")}">failed</td>')
        elif kind == "num":
            cells.append(_num(v, 2 if key in ("seconds", "resource") else 4))
        else:
            title = f' title="{escape(r["metric"])}"' if key == "id" and r.get("metric") else ""
            cells.append(f"<td{title}>{escape(str(v if v is not None else '-'))}</td>")
    return f'<tr class="{cls}">' + "".join(cells) + "</tr>"


def _leaderboard(board: list[dict[str, Any]], best_id: str | None) -> str:
    if not board:
        return "<h2>Leaderboard</h2><p>no runs yet: <code>featcache train</code> or <code>featcache search</code>.</p>"
    head = "".join(f'<th data-key="{k}" data-type="{t}">{escape(label)}</th>' for k, label, t in _COLUMNS)
    body = "\n".join(_board_row(r, best_id) for r in board)
    cv = sorted({r["metric"] for r in board if r["kind"] == "trial" and r.get("metric") != "val accuracy"})
    note = (
        f'<p class="sub">search trials scored by {escape(", ".join(cv))} show it in the val column.</p>'
        if cv
        else ""
    )
    return (
        f'<h2>Leaderboard</h2><p class="sub">{len(board)} rows · click a column header to sort · the best'
        " run on val is highlighted (test scores never choose) · search trials have no test score (a search"
        " never reads the test split); <i>rows</i> is the share of training rows a trial used.</p>"
        f'{note}<div class="scroll"><table class="sortable" id="leaderboard"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


# -- one run in detail ---------------------------------------------------------------------------------


def _run_section(
    run_dir: Path, meta: dict, n_thumbs: int, notes: list[str], is_best: bool
) -> tuple[str, int]:
    from pipeline.utils.plots import plot_confusion, plot_learning_curves

    m = read_metrics(run_dir)
    names = m.class_names
    kind = "fine-tuned run" if m.kind == "finetune" else "run"
    label = "best on val" if is_best else "chosen with --run"
    info = [
        ("head", f"{m.get('head')} {json.dumps(m.get('params') or {}, sort_keys=True)}"),
        ("layer · transforms", f"{m.get('layer')} · {' → '.join(m.get('transforms') or []) or 'none'}"),
        ("accuracy", " · ".join(f"{s} {_fmt((m.get(s) or {}).get('accuracy'))}" for s in ("val", "test"))),
        ("created", m.get("created")),
        ("folder", str(run_dir)),
    ]
    if m.get("kind") == "finetune":
        info.insert(0, ("fine-tuned from", Path(m.get("source_run", "?")).name))
    parts = [
        f'<h2>{kind.capitalize()} {escape(run_dir.name)} <span class="sub">({label})</span></h2>',
        _dl(info),
    ]
    parts.append(_per_class(m, names))
    imgs = []
    for split in ("val", "test"):
        s = m.get(split) or {}
        if s.get("confusion_matrix"):
            title = f"{m.get('head')} · {split} · acc {s['accuracy']:.3f}"
            imgs.append(
                _img(
                    _plot(plot_confusion, s["confusion_matrix"], names, title),
                    f"confusion, {split}",
                    "plot half",
                )
            )
    if imgs:
        parts.append("<h3>Confusion matrices</h3>" + "".join(imgs))
    history = m.get("history") or {}
    if history.get("loss"):
        title = f"{m.get('head')} learning curves ({len(history['loss'])} epochs)"
        parts.append(
            "<h3>Learning curves</h3>" + _img(_plot(plot_learning_curves, history, title), "learning curves")
        )
    thumbs, n = _misclassified(run_dir, meta, n_thumbs, notes)
    parts.append(thumbs)
    return "\n".join(parts), n


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"


def _per_class(m: dict[str, Any], names: list[str]) -> str:
    splits = [s for s in ("val", "test") if (m.get(s) or {}).get("per_class")]
    if not splits:
        return ""
    head = "".join(
        f'<th data-type="num">{s} {k}</th>' for s in splits for k in ("precision", "recall", "F1")
    ) + "".join(f'<th data-type="num">{s} n</th>' for s in splits)
    body = []
    for name in names:
        cells = [
            _num(m[s]["per_class"].get(name, {}).get(k), 3)
            for s in splits
            for k in ("precision", "recall", "f1")
        ]
        cells += [_num(m[s]["per_class"].get(name, {}).get("support")) for s in splits]
        body.append(f"<tr><td>{escape(name)}</td>{''.join(cells)}</tr>")
    return (
        "<h3>Per class</h3>"
        f'<table class="sortable"><thead><tr><th data-key="class">class</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _misclassified(run_dir: Path, meta: dict, n: int, notes: list[str]) -> tuple[str, int]:
    """Thumbnails of the most confidently wrong test images (``misclassified.csv`` is sorted that way)."""
    path = run_dir / "misclassified.csv"
    if not path.is_file() or n <= 0:
        return "", 0
    with open(path, newline="", encoding="utf-8") as f:
        wrong = list(csv.DictReader(f))[:n]
    if not wrong:
        return "<h3>Misclassified test images</h3><p>none: every test image was classified correctly.</p>", 0
    pngs, why = _thumbnails(meta, [w["key"] for w in wrong])
    if why:
        notes.append(f"{run_dir.name}: {why}")
    figs = []
    for w in wrong:
        pic = (
            _img(pngs[w["key"]], w["key"], "thumb") if w["key"] in pngs else "<div>(image unavailable)</div>"
        )
        figs.append(
            f'<figure>{pic}<figcaption title="{escape(w["key"])}">true {escape(w["true"])}<br>'
            f"predicted <b>{escape(w['predicted'])}</b> ({float(w['probability']):.0%})</figcaption></figure>"
        )
    note = f'<p class="note">{escape(why)}</p>' if why else ""
    return (
        '<h3>Most confidently wrong test images</h3><p class="sub">as the backbone saw them'
        f" ({escape(str(meta.get('image_size')))} px, resize {escape(str(meta.get('resize')))}); "
        f'all of them in <code>{escape(str(path))}</code></p>{note}<div class="thumbs">{"".join(figs)}</div>',
        len(pngs),
    )


def _thumbnails(meta: dict, keys: list[str], side: int = 112) -> tuple[dict[str, bytes], str]:
    """PNG thumbnails of ``keys``, read through the image pipeline extraction used; (pngs, why some lack)."""
    from pipeline.cache.fingerprint import decode_policy
    from pipeline.data.images import thumbnails
    from pipeline.model.rebuild import cache_dataset

    try:
        ds = cache_dataset(meta)
    except FeatcacheError as e:
        return {}, f"images not shown: the dataset cannot be read ({e})"
    by_key = {s.key: s for s in ds.samples}
    samples = [by_key[k] for k in keys if k in by_key]
    size, policy = int(meta.get("image_size") or side), str(meta.get("resize") or "stretch")
    decode = decode_policy(meta.get("feature_key") or {})  # as the cache's rows were decoded
    out = thumbnails(ds, samples, size, policy, decode=decode, side=side) if samples else {}
    missing = len(keys) - len(out)
    return out, (f"{missing} of {len(keys)} images are no longer readable in the dataset" if missing else "")


# -- the feature map -----------------------------------------------------------------------------------


def _feature_map(
    cache, layer: str, map_rows: int, tsne_rows: int, seed: int = 0
) -> tuple[bytes | None, tuple[int, int]]:
    """PCA of up to ``map_rows`` cached rows and t-SNE of the first ``tsne_rows`` of them, as one PNG."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from pipeline.data.augment import is_view_key
    from pipeline.utils.plots import plot_feature_map

    rows = np.asarray([r for r, k in enumerate(cache.keys) if not is_view_key(k)], np.int64)
    rows = np.random.default_rng(seed).permutation(rows)[: max(0, map_rows)]
    if len(rows) < 3:
        return None, (0, 0)
    X = cache.features(layer, rows).reshape(len(rows), -1).astype(np.float64)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    y = cache.labels[rows]
    pca = PCA(n_components=2, random_state=seed).fit(X)
    ev = pca.explained_variance_ratio_
    maps = {"PCA": (pca.transform(X), y, (f"PC 1 ({ev[0]:.0%} of variance)", f"PC 2 ({ev[1]:.0%})"))}
    k = min(tsne_rows, len(rows))
    if k >= 10:
        Xt = PCA(n_components=min(50, k, X.shape[1]), random_state=seed).fit_transform(X[:k])
        tsne = TSNE(n_components=2, perplexity=min(30.0, (k - 1) / 3), init="pca", random_state=seed)
        # one OpenMP thread: on a busy machine the Barnes-Hut threads spin-wait (200 rows took 118 s, not 6)
        with threadpool_limits(limits=1):
            maps["t-SNE"] = (tsne.fit_transform(Xt), y[:k], ("t-SNE 1", "t-SNE 2"))
    title = f"cached features of {layer}, coloured by class"
    png = _plot(plot_feature_map, maps, list(cache.class_names), title)
    return png, (len(rows), k if "t-SNE" in maps else 0)


def _map_section(png: bytes | None, layer: str, n: tuple[int, int]) -> str:
    if png is None:
        return "<h2>Feature map</h2><p>too few rows to map.</p>"
    return (
        f'<h2>Feature map</h2><p class="sub">{n[0]} cached rows of <code>{escape(layer)}</code> (standardized)'
        f" projected on their first two principal components; t-SNE (scikit-learn) of {n[1]} of them."
        " Classes that form separate clouds are easy for a linear head.</p>" + _img(png, "feature map")
    )
