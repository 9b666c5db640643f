"""The sections of a single-label report: the cache, the leaderboard, one run in detail (per-class scores,
confusion matrices, learning curves, the most confidently wrong test images) and the map of the features."""

from __future__ import annotations

import csv
import json
import time
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stages.report.html import dl, fmt, img, num, plot
from pipeline.utils.config import SPLITS
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import read_metrics
from pipeline.utils.staleness import ranked

# -- the cache -----------------------------------------------------------------------------------------


def header(cache, cache_path: Path, root: Path) -> str:
    return (
        f"<h1>featcache report · {escape(str(cache.meta.get('dataset', '?')))}</h1>"
        f'<p class="sub">cache <code>{escape(str(cache_path))}</code> · runs <code>{escape(str(root))}</code>'
        f" · written {escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"
    )


def cache_section(cache, cache_path: Path) -> str:
    from pipeline.data.augment import view_mask

    m = cache.meta
    dims = ", ".join(f"{layer} ({int(np.prod(cache.dataset(layer).shape[1:]))})" for layer in cache.layers)
    views = int(view_mask(cache.keys).sum())
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
    groups = list(enumerate(cache.class_names))
    if cache.multilabel:  # an image counts under each of its classes, and under "(no label)" without one
        groups.append((len(groups), "(no label)"))
    for i, name in groups:
        member = _member(cache.labels, i)
        counts = [int((member & (cache.split == j)).sum()) for j in range(len(SPLITS))]
        body.append(f"<tr><td>{escape(name)}</td>" + "".join(num(c) for c in counts) + num(sum(counts)))
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
    return f"<h2>Cache</h2>{dl(info)}<h3>Rows per split and class</h3>{table}{_skipped(cache_path)}"


def _member(labels: np.ndarray, i: int) -> np.ndarray:
    """The rows of class ``i``: a label index, or a column of a multi-hot matrix (one past it: no label)."""
    if labels.ndim == 1:
        return labels == i
    return labels[:, i] == 1 if i < labels.shape[1] else labels.sum(axis=1) == 0


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

COLUMNS = (
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
    ("val_n", "n val", "num"),
    ("test_n", "n test", "num"),
    ("resource", "rows", "num"),
    ("seconds", "time (s)", "num"),
    ("created", "created", "text"),
)


def _board_row(r: dict[str, Any], best_id: str | None, columns) -> str:
    failed = r.get("status") not in (None, "ok")
    cls = "best" if r["id"] == best_id else "failed" if failed else ""
    score = next((key for key, _, kind in columns if kind == "num"), None)  # a failed trial says so here
    cells = []
    for key, _, kind in columns:
        v = r.get(key)
        if key == "params":
            v = json.dumps(v, sort_keys=True) if v else "{}"
        if key == "resource" and v is None:
            v = 1.0
        if key == score and failed:
            cells.append(f'<td class="n" data-v="" title="{escape(r.get("error") or "")}">failed</td>')
        elif kind == "num":
            cells.append(num(v, 2 if key in ("seconds", "resource") else 4))
        else:
            title = f' title="{escape(r["metric"])}"' if key == "id" and r.get("metric") else ""
            cells.append(f"<td{title}>{escape(str(v if v is not None else '-'))}</td>")
    return f'<tr class="{cls}">' + "".join(cells) + "</tr>"


def leaderboard(
    board: list[dict[str, Any]], best_id: str | None, columns=COLUMNS, metric: str = "val accuracy"
) -> str:
    """The sortable table of every run and trial scored on the cache as it is; ``columns`` are ``(row key,
    header, "num" or "text")``, the first ``num`` one the val score (``metric``: trials scored otherwise get
    a note). Stale rows (scored on an older state of the cache) follow in a table of their own, unranked."""
    if not board:
        return "<h2>Leaderboard</h2><p>no runs yet: <code>featcache train</code> or <code>featcache search</code>.</p>"
    head = "".join(f'<th data-key="{k}" data-type="{t}">{escape(label)}</th>' for k, label, t in columns)
    current = [r for r in board if ranked(r)]
    body = "\n".join(_board_row(r, best_id, columns) for r in current)
    cv = sorted({r["metric"] for r in board if r["kind"] == "trial" and r.get("metric") != metric})
    note = (
        f'<p class="sub">search trials scored by {escape(", ".join(cv))} show it in the val column.</p>'
        if cv
        else ""
    )
    return (
        f'<h2>Leaderboard</h2><p class="sub">{len(current)} rows · click a column header to sort · the best'
        " run on val is highlighted (test scores never choose) · search trials have no test score (a search"
        " never reads the test split); <i>rows</i> is the share of training rows a trial used; <i>n val</i>"
        " and <i>n test</i> the images each run was scored on.</p>"
        f'{note}<div class="scroll"><table class="sortable" id="leaderboard"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>" + _stale_board(board, head, columns)
    )


def _stale_board(board: list[dict[str, Any]], head: str, columns) -> str:
    """The runs and trials scored on an older state of the cache: shown apart, never ranked."""
    stale = [r for r in board if not ranked(r)]
    if not stale:
        return ""
    body = "\n".join(_board_row(r, None, columns) for r in stale)
    return (
        f'<h3>Stale runs</h3><p class="sub">{len(stale)} rows scored on an older state of this cache (its val'
        " or test rows changed since): not comparable with the leaderboard above, never ranked; train them"
        " again to compare.</p>"
        f'<div class="scroll"><table class="sortable" id="stale"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


# -- one run in detail ---------------------------------------------------------------------------------


def run_section(run_dir: Path, meta: dict, n_thumbs: int, notes: list[str], is_best: bool) -> tuple[str, int]:
    from pipeline.utils.plots import plot_confusion, plot_learning_curves

    m = read_metrics(run_dir)
    names = m.class_names
    kind = "fine-tuned run" if m.kind == "finetune" else "run"
    label = "best on val" if is_best else "chosen with --run"
    info = [
        ("head", f"{m.get('head')} {json.dumps(m.get('params') or {}, sort_keys=True)}"),
        ("layer · transforms", f"{m.get('layer')} · {' → '.join(m.get('transforms') or []) or 'none'}"),
        (
            "accuracy",
            " · ".join(
                f"{s} {fmt(m.split(s).get('accuracy'))} ({m.split_rows(s)} images)" for s in ("val", "test")
            ),
        ),
        ("created", m.get("created")),
        ("folder", str(run_dir)),
    ]
    if m.get("kind") == "finetune":
        info.insert(0, ("fine-tuned from", Path(m.get("source_run", "?")).name))
    parts = [
        f'<h2>{kind.capitalize()} {escape(run_dir.name)} <span class="sub">({label})</span></h2>',
        dl(info),
    ]
    parts.append(_per_class(m, names))
    imgs = []
    for split in ("val", "test"):
        s = m.get(split) or {}
        if s.get("confusion_matrix"):
            title = f"{m.get('head')} · {split} · acc {s['accuracy']:.3f}"
            imgs.append(
                img(
                    plot(plot_confusion, s["confusion_matrix"], names, title),
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
            "<h3>Learning curves</h3>" + img(plot(plot_learning_curves, history, title), "learning curves")
        )
    thumbs, n = _misclassified(run_dir, meta, n_thumbs, notes)
    parts.append(thumbs)
    return "\n".join(parts), n


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
            num(m[s]["per_class"].get(name, {}).get(k), 3)
            for s in splits
            for k in ("precision", "recall", "f1")
        ]
        cells += [num(m[s]["per_class"].get(name, {}).get("support")) for s in splits]
        body.append(f"<tr><td>{escape(name)}</td>{''.join(cells)}</tr>")
    return (
        "<h3>Per class</h3>"
        f'<table class="sortable"><thead><tr><th data-key="class">class</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _misclassified(run_dir: Path, meta: dict, n: int, notes: list[str]) -> tuple[str, int]:
    """Thumbnails of the most confidently wrong images, test then val (``misclassified.csv`` is written
    that way; a run from before its ``split`` column lists test images only)."""
    from pipeline.utils.plots import read_misclassified

    path = run_dir / "misclassified.csv"
    if not path.is_file() or n <= 0:
        return "", 0
    rows = read_misclassified(path)
    splits = " and ".join(dict.fromkeys(["test", *(r["split"] for r in rows)])) if rows else "test"
    wrong = rows[:n]
    if not wrong:
        return f"<h3>Misclassified images</h3><p>none: every {splits} image was classified correctly.</p>", 0
    pngs, why = read_thumbnails(meta, [w["key"] for w in wrong])
    if why:
        notes.append(f"{run_dir.name}: {why}")
    figs = []
    for w in wrong:
        pic = img(pngs[w["key"]], w["key"], "thumb") if w["key"] in pngs else "<div>(image unavailable)</div>"
        figs.append(
            f'<figure>{pic}<figcaption title="{escape(w["key"])}">{escape(w["split"])} · true {escape(w["true"])}<br>'
            f"predicted <b>{escape(w['predicted'])}</b> ({float(w['probability']):.0%})</figcaption></figure>"
        )
    note = f'<p class="note">{escape(why)}</p>' if why else ""
    counts = " · ".join(
        f"{k} {sum(r['split'] == k for r in rows)}" for k in dict.fromkeys(r["split"] for r in rows)
    )
    return (
        f'<h3>Most confidently wrong images ({escape(counts)})</h3><p class="sub">test first, then val; as the'
        f" backbone saw them ({escape(str(meta.get('image_size')))} px, resize {escape(str(meta.get('resize')))}); "
        f'all of them in <code>{escape(str(path))}</code></p>{note}<div class="thumbs">{"".join(figs)}</div>',
        len(pngs),
    )


def read_thumbnails(meta: dict, keys: list[str], side: int = 112) -> tuple[dict[str, bytes], str]:
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


def feature_map(
    cache, layer: str, map_rows: int, tsne_rows: int, seed: int = 0
) -> tuple[bytes | None, tuple[int, int]]:
    """PCA of a random sample of up to ``map_rows`` cached rows (:func:`map_sample`) and t-SNE of the first
    ``tsne_rows`` of them, as one PNG; whatever the cache's size, only the sample is read."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from pipeline.utils.plots import plot_feature_map

    rows = map_sample(cache.keys, max(0, map_rows), seed)
    if len(rows) < 3:
        return None, (0, 0)
    X = cache.features(layer, rows).reshape(len(rows), -1).astype(np.float64)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    y, names = cache.labels[rows], list(cache.class_names)
    if y.ndim == 2:  # multi-label: coloured by the first of its classes
        y, names = np.where(y.any(axis=1), y.argmax(axis=1), y.shape[1]), names + ["(no label)"]
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
    title = f"cached features of {layer}, coloured by " + ("first label" if cache.multilabel else "class")
    png = plot(plot_feature_map, maps, names, title)
    return png, (len(rows), k if "t-SNE" in maps else 0)


#: consecutive rows the map's sample takes at each random place: a few chunks of the file, not one per row
MAP_RUN = 16


def map_sample(keys, size: int, seed: int = 0) -> np.ndarray:
    """Up to ``size`` rows that are not augmented views, in random order: all of them when there are no
    more, else runs of :data:`MAP_RUN` consecutive rows at random places (rows of a class sit together in
    a cache, so many places make a mixed sample; one run costs one chunk read, a lone row one too)."""
    from pipeline.data.augment import view_mask

    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(~view_mask(keys))
    if len(ok) <= size:
        return rng.permutation(ok)
    run = min(MAP_RUN, max(1, size))
    starts = rng.choice(len(ok) // run, -(-size // run), replace=False) * run
    picked = ok[(starts[:, None] + np.arange(run)).ravel()]
    return rng.permutation(picked)[:size]


def map_section(png: bytes | None, layer: str, n: tuple[int, int], total: int) -> str:
    if png is None:
        return "<h2>Feature map</h2><p>too few rows to map.</p>"
    what = (
        f"all {n[0]} cached rows"
        if n[0] >= total
        else f"a random sample of {n[0]} of the {total} cached rows"
    )
    return (
        f'<h2>Feature map</h2><p class="sub">{what} of <code>{escape(layer)}</code> (standardized; the sample'
        f" size is <code>report.map_rows</code>) projected on their first two principal components; t-SNE"
        f" (scikit-learn) of {n[1]} of them (<code>report.tsne_rows</code>)."
        " Classes that form separate clouds are easy for a linear head.</p>" + img(png, "feature map")
    )
