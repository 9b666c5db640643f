"""The CSV source format, one parser for a CSV on disk or behind a URL: ``path,label[,split][,group]``.

A ``labels`` column instead of ``label`` makes a multi-label dataset: each cell holds the image's class
names separated by ``;`` or ``|`` (``shirt;bag``), and may be empty (an image with no label: all negative).

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

#: what separates the class names of one multi-label cell
LABEL_SEPARATORS = re.compile(r"[;|]")


class CsvRow(NamedTuple):
    path: str  # as written: relative to the CSV's folder, absolute, or a URL
    label: str
    split: str | None
    group: str | None
    labels: tuple[str, ...] | None = None  # a multi-label CSV's label set (may be empty)


def split_labels(cell: str) -> tuple[str, ...]:
    """The sorted, distinct class names of one ``labels`` cell."""
    return tuple(sorted({x.strip() for x in LABEL_SEPARATORS.split(cell) if x.strip()}))


def read_rows(lines: Iterable[str], where: str, pattern: re.Pattern[str] | None) -> list[CsvRow]:
    """Every row of the CSV ``lines``; errors name ``where`` (the CSV's path or URL) and the line."""
    reader = csv.DictReader(lines)
    fields = set(reader.fieldnames or [])
    multi = "labels" in fields and "label" not in fields
    if not ({"path", "label"} <= fields or multi and "path" in fields):
        raise FeatcacheError(
            f"{where}: CSV needs a header with 'path' and 'label' columns, got {sorted(fields)}"
        )
    rows = []
    for lineno, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        labels = split_labels(row.get("labels") or "") if multi else None
        if labels is not None:
            label = ";".join(labels)
        if not rel or not label and labels is None:
            raise FeatcacheError(f"{where}:{lineno}: empty path or label")
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise FeatcacheError(f"{where}:{lineno}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        group = (row.get("group") or "").strip() or group_of(rel, pattern)
        rows.append(CsvRow(rel, label, split, group, labels))
    if not rows:
        raise FeatcacheError(f"{where}: CSV has no rows")
    return rows
