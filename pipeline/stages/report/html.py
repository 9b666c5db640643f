"""The report page's HTML pieces: inline PNG pictures, sortable numeric cells, definition lists, and the
page itself with its style sheet and script inlined (``assets/``, package data)."""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

import numpy as np

#: The page's style sheet and script, package data read by :func:`asset`. A click on a header sorts its
#: table (numbers high→low first, text a→z; again to reverse; blanks last); ``report.html#sort=KEY`` clicks
#: the header whose data-key is KEY once loaded: how the tests drive it.
ASSETS = "assets"


def asset(name: str) -> str:
    from importlib.resources import files

    return files("pipeline.stages.report").joinpath(ASSETS).joinpath(name).read_text(encoding="utf-8")


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{escape(alt)}" src="{png_uri(data)}">'


def plot(draw, *args) -> bytes:
    buf = io.BytesIO()
    draw(buf, *args)
    return buf.getvalue()


def num(v: Any, digits: int = 4) -> str:
    """A numeric cell: the shown value, and the raw one in ``data-v`` for sorting (blank when missing)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return '<td class="n" data-v="">-</td>'
    shown = f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    return f'<td class="n" data-v="{float(v)!r}">{shown}</td>'


def dl(items: list[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items) + "</dl>"


def page(title: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>\n{asset('report.css')}</style></head>\n<body>\n"
        + "\n".join(sections)
        + f"\n<script>\n{asset('report.js')}</script>\n</body></html>\n"
    )


def fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"
