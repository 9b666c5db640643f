"""The report's backbone comparison: the leaderboard ``featcache compare`` wrote (``leaderboard.json`` in
``<cache_dir>/compare-<id>/``, read as a file: the report never imports another stage) and test accuracy
against extraction cost, one labelled point per candidate and layer."""

from __future__ import annotations

import json
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
    ("images_per_second", "images/s", 1),
    ("cpu_seconds", "CPU s", 1),
    ("cache_bytes", "cache MB", 1),
)


def find_compare(cache_path: Path, chosen: str) -> Path | None:
    """The compare folder to show: ``chosen`` (a folder or its leaderboard.json), else the newest
    ``compare-*/`` with a leaderboard beside the cache; None when there is none."""
    if chosen:
        p = Path(chosen).expanduser()
        folder = p.parent if p.name == LEADERBOARD else p
        if not (folder / LEADERBOARD).is_file():
            raise FeatcacheError(
                f"--compare {chosen}: no {LEADERBOARD} there (a `featcache compare` folder?)"
            )
        return folder
    found = [p.parent for p in Path(cache_path).parent.glob(f"compare-*/{LEADERBOARD}")]
    return max(found, key=lambda p: ((p / LEADERBOARD).stat().st_mtime_ns, p.name)) if found else None


def read_compare(folder: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((folder / LEADERBOARD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FeatcacheError(f"{folder / LEADERBOARD}: unreadable ({str(e)[:120]})") from None
    rows = data.get("candidates") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FeatcacheError(f"{folder / LEADERBOARD}: not a compare leaderboard")
    return rows


def compare_section(folder: Path, cache_path: Path) -> str:
    """The leaderboard table and the accuracy-vs-cost plot."""
    from pipeline.utils.plots import plot_accuracy_cost

    rows = read_compare(folder)
    here = str(Path(cache_path).resolve())
    head = "".join(
        f'<th data-key="{k}" data-type="{"text" if d is None else "num"}">{escape(h)}</th>'
        for k, h, d in _COLS
    )
    body = []
    for r in rows:
        cells = []
        for k, _, d in _COLS:
            v = r.get(k)
            if k == "cache_bytes" and isinstance(v, (int, float)):
                v = v / 2**20
            cells.append(f"<td>{escape(str(v if v is not None else '-'))}</td>" if d is None else num(v, d))
        cls = ' class="best"' if str(r.get("cache") or "") == here else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    points = [
        {
            "label": f"{r.get('label')} · {r.get('layer')}",
            "accuracy": r.get("test_accuracy"),
            "images_per_second": r.get("images_per_second"),
            "cpu_seconds": r.get("cpu_seconds"),
        }
        for r in rows
    ]
    panels = [
        (k, label)
        for k, label in (("images_per_second", "extraction images / s"), ("cpu_seconds", "extraction CPU s"))
        if any(isinstance(p[k], (int, float)) for p in points)
    ]
    title = f"{folder.name}: test accuracy against extraction cost"
    pic = img(plot(plot_accuracy_cost, points, panels, title), "accuracy vs cost") if panels and rows else ""
    return (
        f'<h2>Backbone comparison</h2><p class="sub">the leaderboard of <code>featcache compare</code> in'
        f" <code>{escape(str(folder))}</code>: one linear probe per candidate and cached layer, best first by"
        " val accuracy; the row of this report's cache is highlighted. Images/s and CPU seconds are those of"
        " the run that extracted each cache.</p>"
        f'<div class="scroll"><table class="sortable" id="compare"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{pic}"
    )
