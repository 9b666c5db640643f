"""The quarantine list: files that failed to decode, with why, kept beside the cache and never retried unchanged."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.cache.h5 import write_error
from pipeline.data.sources import Sample
from pipeline.utils.io import atomic_path


def read_quarantine(path: Path) -> dict[str, str]:
    """digest → reason of files that failed before; an unchanged file is not decoded again."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {r["digest"]: r["reason"] for r in csv.DictReader(f) if r.get("digest")}


def write_quarantine(path: Path, bad: list[tuple[Sample, str, str]]) -> Path | None:
    try:
        if not bad:
            if path.exists():
                path.unlink()
            return None
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["key", "digest", "reason"])
            for s, digest, reason in bad:
                w.writerow([s.key, digest, reason])
    except OSError as e:
        raise write_error(path, e) from None
    return path


def quarantine_path(final: Path) -> Path:
    return final.with_name(final.stem + ".quarantine.csv")
