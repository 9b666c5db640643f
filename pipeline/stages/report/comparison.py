"""The report's backbone comparison: the leaderboard ``featcache compare`` wrote (``leaderboard.json`` in
``<cache_dir>/compare-<id>/``, read as a file: the report never imports another stage) and the test score
against extraction cost, one labelled point per candidate and layer. A multi-label cache's compare ranks by
val macro mAP (its rows carry ``val_map``, ``test_map`` and ``micro_map``, no accuracy), and so does its table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from pipeline.stages.report.html import img, num, plot
from pipeline.utils.errors import FeatcacheError

LEADERBOARD = "leaderboard.json"

_COLS = (
    ("rank", "#", 0),
    ("label", "candidate", None),
    ("layer", "layer", None),
    ("image_size", "px", 0),
    ("val_accuracy", "val acc", 4),
    ("test_accuracy", "test acc", 4),
    ("macro_f1", "macro-F1", 4),
    ("dim", "dim", 0),
    ("extracted", "extracted", 0),
    ("reused", "reused", 0),
    ("images_per_second", "images/s", 1),
    ("cpu_seconds", "CPU s", 1),
    ("cpu_seconds_per_image", "CPU s / image", 3),
    ("cache_bytes", "cache MB", 1),
)
#: a multi-label compare's scores, where a single-label one shows accuracy
_MAP_COLS = {
    "val_accuracy": [("val_map", "val mAP", 4)],
    "test_accuracy": [("test_map", "test mAP", 4), ("micro_map", "test micro mAP", 4)],
}
_MULTILABEL_COLS = tuple(c for col in _COLS for c in _MAP_COLS.get(col[0], [col]))


@dataclass
class Compared:
    """The compare shown (its folder and rows; None when there is none) and why others were not."""

    folder: Path | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_compare(cache_path: Path, chosen: str) -> Compared:
    """The compare to show: ``chosen`` (a folder or its leaderboard.json: anything wrong with it is an
    error), else the newest ``compare-*/`` beside the cache whose rows include this cache (one that cannot
    be read is a note, not an error: the report does not depend on it)."""
    if chosen:
        p = Path(chosen).expanduser()
        folder = p.parent if p.name == LEADERBOARD else p
        if not (folder / LEADERBOARD).is_file():
            raise FeatcacheError(
                f"--compare {chosen}: no {LEADERBOARD} there (a `featcache compare` folder?)"
            )
        return Compared(folder, read_compare(folder))
    here = Path(cache_path).resolve()
    found = [p.parent for p in Path(cache_path).parent.glob(f"compare-*/{LEADERBOARD}")]
    found.sort(key=lambda p: ((p / LEADERBOARD).stat().st_mtime_ns, p.name), reverse=True)
    out = Compared()
    for folder in found:
        try:
            rows = read_compare(folder)
        except FeatcacheError as e:
            out.notes.append(f"compare not shown: {e}")
            continue
        if any(r.get("cache") and Path(str(r["cache"])).resolve() == here for r in rows):
            out.folder, out.rows = folder, rows
            break
    return out


def read_compare(folder: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((folder / LEADERBOARD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FeatcacheError(f"{folder / LEADERBOARD}: unreadable ({str(e)[:120]})") from None
    rows = data.get("candidates") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FeatcacheError(f"{folder / LEADERBOARD}: not a compare leaderboard")
    return rows


def cost_per_image(row: dict[str, Any]) -> float | None:
    """CPU seconds per image the candidate's call extracted (None: nothing extracted, its cache was reused);
    a leaderboard from before the column gets it from ``cpu_seconds`` and ``extracted``."""
    if row.get("cpu_seconds_per_image") is not None:
        return float(row["cpu_seconds_per_image"])
    n, cpu = row.get("extracted"), row.get("cpu_seconds")
    return float(cpu) / n if isinstance(n, int) and n > 0 and isinstance(cpu, (int, float)) else None


def compare_section(compared: Compared, cache_path: Path) -> str:
    """The leaderboard table and the score-vs-cost plot; the notes on compares not shown."""
    from pipeline.utils.plots import plot_accuracy_cost

    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in compared.notes)
    if compared.folder is None:
        return f"<h2>Backbone comparison</h2>{notes}" if notes else ""
    folder, rows = compared.folder, compared.rows
    multilabel = any("val_map" in r for r in rows)
    cols = _MULTILABEL_COLS if multilabel else _COLS
    score, score_key = ("test macro mAP", "test_map") if multilabel else ("test accuracy", "test_accuracy")
    here = str(Path(cache_path).resolve())
    head = "".join(
        f'<th data-key="{k}" data-type="{"text" if d is None else "num"}">{escape(h)}</th>'
        for k, h, d in cols
    )
    body = []
    for r in rows:
        cells = []
        for k, _, d in cols:
            v = cost_per_image(r) if k == "cpu_seconds_per_image" else r.get(k)
            if k == "cache_bytes" and isinstance(v, (int, float)):
                v = v / 2**20
            if v is None and k == "cpu_seconds_per_image" and r.get("extracted") == 0:
                cells.append('<td class="n" data-v="">cached</td>')
                continue
            cells.append(f"<td>{escape(str(v if v is not None else '-'))}</td>" if d is None else num(v, d))
        cls = ' class="best"' if str(r.get("cache") or "") == here else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    points = [
        {
            "label": f"{r.get('label')} · {r.get('layer')}",
            "accuracy": r.get(score_key),
            "images_per_second": r.get("images_per_second"),
            "cpu_seconds_per_image": cost_per_image(r),
            "cached": r.get("extracted") == 0,
        }
        for r in rows
    ]
    axes = (
        ("images_per_second", "extraction images / s"),
        ("cpu_seconds_per_image", "CPU s per extracted image"),
    )
    panels = [
        (k, label) for k, label in axes if any(isinstance(p[k], (int, float)) or p["cached"] for p in points)
    ]
    title = f"{folder.name}: {score} against extraction cost"
    alt = "mAP vs cost" if multilabel else "accuracy vs cost"
    pic = img(plot(plot_accuracy_cost, points, panels, title, score), alt) if panels and rows else ""
    return (
        f'<h2>Backbone comparison</h2>{notes}<p class="sub">the leaderboard of <code>featcache compare</code> in'
        f" <code>{escape(str(folder))}</code>: one linear probe per candidate and cached layer, best first by"
        f" {'val macro mAP' if multilabel else 'val accuracy'}; the row of this report's cache is highlighted."
        " Images/s and CPU seconds are those of the compare call that scored each candidate, and the cost is per"
        " image it extracted: a candidate whose cache already held every image extracted nothing (cached).</p>"
        f'<div class="scroll"><table class="sortable" id="compare"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{pic}"
    )
