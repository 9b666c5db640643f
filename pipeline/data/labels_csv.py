"""The CSV source format, one parser for a CSV on disk or behind a URL: ``path,label[,split][,group]``.

``split`` fixes a row's split (train, val or test; empty = hashed), ``group`` keeps related images in one
split and falls back to ``data.group_pattern`` on the path.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import NamedTuple

from pipeline.data.splits import group_of
from pipeline.utils.config import SPLITS
from pipeline.utils.errors import FeatcacheError


class CsvRow(NamedTuple):
    path: str  # as written: relative to the CSV's folder, absolute, or a URL
    label: str
    split: str | None
    group: str | None


def read_rows(lines: Iterable[str], where: str, pattern: re.Pattern[str] | None) -> list[CsvRow]:
    """Every row of the CSV ``lines``; errors name ``where`` (the CSV's path or URL) and the line."""
    reader = csv.DictReader(lines)
    fields = set(reader.fieldnames or [])
    if not {"path", "label"} <= fields:
        raise FeatcacheError(
            f"{where}: CSV needs a header with 'path' and 'label' columns, got {sorted(fields)}"
        )
    rows = []
    for lineno, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise FeatcacheError(f"{where}:{lineno}: empty path or label")
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise FeatcacheError(f"{where}:{lineno}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        rows.append(CsvRow(rel, label, split, (row.get("group") or "").strip() or group_of(rel, pattern)))
    if not rows:
        raise FeatcacheError(f"{where}: CSV has no rows")
    return rows
