"""The audit's CSV files beside a cache (``featcache audit`` writes them; the report reads them back):
``<cache stem>.label_issues.csv`` and ``<cache stem>.near_duplicates.csv``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


def audit_paths(cache_path: Path) -> dict[str, Path]:
    """The audit's files of the cache at ``cache_path``: its label issues and its near-duplicate pairs."""
    stem = Path(cache_path).with_suffix("")
    return {
        "label issues": Path(f"{stem}.label_issues.csv"),
        "near-duplicates": Path(f"{stem}.near_duplicates.csv"),
    }


@dataclass
class AuditFindings:
    """An audit's files read back: rows as the CSV holds them (strings), most suspicious first."""

    label_issues: list[
        dict[str, str]
    ]  # rank, key, split, given, suggested, score (multi-label: class, issue...)
    pairs: list[dict[str, str]]  # a, b, similarity, split_a, split_b, cross_split ("1": a leak)
    paths: dict[str, Path]
    older_than_cache: bool  # the cache changed after the audit: its rows may differ

    @property
    def leaks(self) -> list[dict[str, str]]:
        """Near-duplicate pairs across splits: the same picture in train and val/test inflates their scores."""
        return [p for p in self.pairs if p.get("cross_split") == "1"]


def read_audit(cache_path: Path) -> AuditFindings | None:
    """The cache's audit, or None when ``featcache audit`` has not written both files beside it."""
    paths = audit_paths(cache_path)
    if not all(p.is_file() for p in paths.values()):
        return None
    rows = {}
    for name, path in paths.items():
        with open(path, newline="", encoding="utf-8") as f:
            rows[name] = list(csv.DictReader(f))
    written = min(p.stat().st_mtime for p in paths.values())
    older = Path(cache_path).is_file() and Path(cache_path).stat().st_mtime > written
    return AuditFindings(rows["label issues"], rows["near-duplicates"], paths, older)
