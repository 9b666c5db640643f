"""The report of a multi-label cache: the leaderboard by macro mAP, and for a run in detail its summary
(macro/micro mAP against the label-frequency baseline), a per-class table (AP, threshold, precision, recall,
F1, support), precision-recall curves per class on test, and the test images with the most wrong labels
(the multi-label counterpart of the confusion matrix and the most confidently wrong images).

A run's ``metrics.json`` holds its scores but not its per-image test scores, so the curves and the worst
images come from the run's stage-2 model on the cache's test rows (loaded after its manifest is verified);
a fine-tuned run's model reads images, and the report never runs the backbone, so it has neither."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stages.report.html import dl, fmt, img, num, plot
from pipeline.stages.report.sections import COLUMNS as SINGLE_LABEL_COLUMNS
from pipeline.stages.report.sections import read_thumbnails
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import best_run, read_metrics

#: why a fine-tuned run has no curves: its model reads images, and the report never runs the backbone
FINETUNE_NO_CURVES = (
    "a fine-tuned run's model is the backbone and head together and scores images, not cached features;"
    " the report does not run the backbone, so its per-class scores above are those `featcache finetune`"
    " measured"
)

#: the leaderboard's columns on a multi-label cache: mAP where a single-label cache shows accuracy
MAP_COLUMNS = {
    "val_accuracy": [("val_macro_map", "val macro mAP", "num")],
    "test_accuracy": [
        ("test_macro_map", "test macro mAP", "num"),
        ("test_micro_map", "test micro mAP", "num"),
    ],
    "resource": [],
}
COLUMNS = tuple(c for col in SINGLE_LABEL_COLUMNS for c in MAP_COLUMNS.get(col[0], [col]))


def multilabel_board(board: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leaderboard rows with each run's val/test macro mAP (its row's, from :func:`run_row`) and test
    micro mAP (from its metrics.json); a search trial's val macro mAP is its score."""
    out = []
    for r in board:
        if r["kind"] == "trial":  # scored by val (or CV) macro mAP, carried as the trial's score
            out.append({**r, "val_macro_map": r.get("val_accuracy"), "test_macro_map": None})
            continue
        test = read_metrics(r["path"], missing_ok=True).split("test")
        out.append(
            {
                **r,
                "val_macro_map": r.get("val_macro_map"),
                "test_macro_map": r.get("test_macro_map"),
                "test_micro_map": test.get("micro_map"),
            }
        )
    return out


def best_multilabel(board: list[dict[str, Any]]) -> dict[str, Any] | None:
    """:func:`best_run`'s choice (train and fine-tuned runs, val never test, newest on ties) by val macro mAP."""
    runs = [r for r in board if r["kind"] in ("train", "finetune")]
    best = best_run([{**r, "val_accuracy": r.get("val_macro_map")} for r in runs])
    return next(r for r in runs if r["id"] == best["id"]) if best else None


def test_scores(run_dir: Path, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(test rows, their multi-hot labels, the run's per-class scores), or why they cannot be had."""
    from pipeline.heads.multilabel import label_scores
    from pipeline.heads.persist import load_model

    m = read_metrics(run_dir)
    if m.kind == "finetune":
        return FINETUNE_NO_CURVES
    rows = cache.rows("test")
    if not len(rows):
        return "the test split is empty"
    try:
        model = load_model(run_dir)
        X = cache.features(cache.layer_name(m.layer), rows)
        P, _ = label_scores(model, X)
    except FeatcacheError as e:
        return f"test scores unavailable: {e}"
    if P.shape != (len(rows), len(cache.class_names)):
        return f"test scores unavailable: the model gives {P.shape[1]} scores for {len(cache.class_names)} classes"
    return rows, cache.labels[rows].astype(np.uint8), P


def multilabel_run_section(
    run_dir: Path, scores, keys: list[str], meta: dict, n_thumbs: int, notes: list[str], is_best: bool
) -> tuple[str, int]:
    """One multi-label run in detail; ``scores`` is :func:`test_scores`'s answer. Returns (HTML, thumbnails)."""
    from pipeline.utils.plots import plot_pr_curves

    m = read_metrics(run_dir)
    names = m.class_names
    kind = "Fine-tuned run" if m.kind == "finetune" else "Run"
    label = "best on val (macro mAP)" if is_best else "chosen with --run"
    val, test = m.get("val") or {}, m.get("test") or {}
    how = _head_kind(m)
    info = [
        ("head", f"{m.get('head')} {json.dumps(m.get('params') or {}, sort_keys=True)}" + (f" ({how})" if how else "")),
        ("layer · transforms", f"{m.get('layer')} · {' → '.join(m.get('transforms') or []) or 'none'}"),
        ("macro mAP", f"val {fmt(val.get('macro_map'))} · test {fmt(test.get('macro_map'))}"
         f" (label-frequency baseline {fmt(test.get('map_baseline'))})"),
        ("micro mAP", f"val {fmt(val.get('micro_map'))} · test {fmt(test.get('micro_map'))}"),
        ("F1 at the thresholds", f"test macro {fmt(test.get('macro_f1'))} · micro {fmt(test.get('micro_f1'))}"),
        ("subset accuracy", f"val {fmt(val.get('subset_accuracy'))} · test {fmt(test.get('subset_accuracy'))}"),
        ("labels per image", f"test {fmt(test.get('label_cardinality'))} true,"
         f" {fmt(test.get('predicted_cardinality'))} predicted"),
        ("created", m.get("created")),
        ("folder", str(run_dir)),
    ]  # fmt: skip
    if m.kind == "finetune":
        info.insert(0, ("fine-tuned from", Path(m.get("source_run", "?")).name))
    parts = [
        f'<h2>{kind} {escape(run_dir.name)} <span class="sub">({label}, multi-label)</span></h2>',
        dl(info),
        _per_class(m, names),
    ]
    if isinstance(scores, str):
        notes.append(f"{run_dir.name}: {scores}")
        parts.append(f'<p class="note">no precision-recall curves: {escape(scores)}</p>')
        return "\n".join(parts), 0
    rows, Y, P = scores
    title = f"{m.get('head')} · test · macro mAP {fmt(test.get('macro_map'))}"
    aps = _test_aps(m, names, Y, P)
    parts.append(
        '<h3>Precision-recall curves (test)</h3><p class="sub">one curve per class, from the run\'s scores'
        " of the test images; the legend gives each class's average precision.</p>"
        + img(plot(plot_pr_curves, Y, P, names, aps, title), "precision-recall curves")
    )
    thumbs, n = _worst_rows(run_dir, rows, Y, P, m.thresholds, keys, names, meta, n_thumbs, notes)
    parts.append(thumbs)
    return "\n".join(parts), n


def _head_kind(m) -> str:
    """How the run scores each class, from its head's name (and whether it was fine-tuned)."""
    from pipeline.heads.multilabel import NATIVE_HEADS, OVR_HEADS

    if m.kind == "finetune":
        return "fine-tuned end to end, a sigmoid per class"
    return "one-vs-rest" if m.head in OVR_HEADS else "a sigmoid per class" if m.head in NATIVE_HEADS else ""


def _test_aps(m, names: list[str], Y: np.ndarray, P: np.ndarray) -> list[float | None]:
    """Each class's test AP as the run measured it (the per-class table's), else from its scores."""
    from pipeline.heads.metrics import class_aps

    per_class = m.split("test").get("per_class") or {}
    if all(name in per_class for name in names):
        return [per_class[name].get("ap") for name in names]
    return [None if np.isnan(a) else float(a) for a in class_aps(Y, P)]


def _per_class(m: dict[str, Any], names: list[str]) -> str:
    test, val = (m.get("test") or {}).get("per_class") or {}, (m.get("val") or {}).get("per_class") or {}
    if not test and not val:
        return ""
    cols = (("ap", "test AP", 3), ("threshold", "threshold", 3), ("precision", "test precision", 3))
    cols += (("recall", "test recall", 3), ("f1", "test F1", 3), ("support", "test n", 0))
    head = "".join(
        f'<th data-key="{h.replace(" ", "_")}" data-type="num">{escape(h)}</th>' for _, h, _ in cols
    )
    head += '<th data-key="val_AP" data-type="num">val AP</th><th data-key="val_n" data-type="num">val n</th>'
    thresholds = dict(zip(names, m.thresholds, strict=True)) if m.get("thresholds") else {}
    body = []
    for name in names:
        t, v = test.get(name, {}), val.get(name, {})
        cells = [num(thresholds.get(name) if k == "threshold" else t.get(k), d or 4) for k, _, d in cols]
        cells += [num(v.get("ap"), 3), num(v.get("support"))]
        body.append(f"<tr><td>{escape(name)}</td>{''.join(cells)}</tr>")
    return (
        '<h3>Per class</h3><p class="sub">average precision of each class\'s scores, and precision, recall and'
        " F1 at its decision threshold (chosen on val to maximize that class's F1); n = images with the"
        " class.</p>"
        f'<table class="sortable" id="per-class"><thead><tr><th data-key="class">class</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _worst_rows(run_dir, rows, Y, P, thresholds, keys, names, meta, n: int, notes) -> tuple[str, int]:
    """The test images with the most wrong labels at the thresholds, the most confidently wrong first."""
    from pipeline.heads.multilabel import above

    wrong = Y != above(P, thresholds)
    # how far each wrong label's score is on the wrong side: |y - p| summed over the wrong labels
    badness = (np.abs(Y - P) * wrong).sum(axis=1)
    order = [int(i) for i in np.argsort(-badness, kind="stable") if wrong[i].any()][: max(0, n)]
    if n <= 0:
        return "", 0
    if not order:
        return (
            "<h3>Test images with wrong labels</h3><p>none: every test image got exactly its labels.</p>",
            0,
        )
    pick = [keys[int(rows[i])] for i in order]
    pngs, why = read_thumbnails(meta, pick)
    if why:
        notes.append(f"{run_dir.name}: {why}")
    figs = []
    for i, key in zip(order, pick, strict=True):
        pic = img(pngs[key], key, "thumb") if key in pngs else "<div>(image unavailable)</div>"
        miss = [f"{names[c]} ({P[i, c]:.0%})" for c in np.flatnonzero(wrong[i] & (Y[i] == 1))]
        extra = [f"{names[c]} ({P[i, c]:.0%})" for c in np.flatnonzero(wrong[i] & (Y[i] == 0))]
        caption = "<br>".join(
            f"{what} <b>{escape(', '.join(v))}</b>" for what, v in (("missed", miss), ("extra", extra)) if v
        )
        figs.append(f'<figure>{pic}<figcaption title="{escape(key)}">{caption}</figcaption></figure>')
    note = f'<p class="note">{escape(why)}</p>' if why else ""
    return (
        f'<h3>Test images with the most wrong labels</h3><p class="sub">{int(wrong.any(axis=1).sum())} of'
        f" {len(rows)} test images have at least one label wrong at the thresholds; the worst {len(order)},"
        " with each missed label (true, predicted absent) and extra label (predicted, not true) and its score,"
        f' as the backbone saw them.</p>{note}<div class="thumbs">{"".join(figs)}</div>',
        len(pngs),
    )
