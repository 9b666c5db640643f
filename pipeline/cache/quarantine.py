"""Unreadable samples: what ``data.on_error`` does with them, and the quarantine list (files that failed to
decode, with why) kept beside the cache and never retried unchanged."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.cache.h5 import write_error
from pipeline.data.sources import Sample
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path


class Unreadable:
    """The samples a run could not read, each met by ``data.on_error`` here and only here: ``fail`` stops the
    run at the first one, naming it; ``skip`` keeps (sample, digest, reason) in :attr:`items` for the
    quarantine file."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.items: list[tuple[Sample, str, str]] = []

    def add(self, sample: Sample, digest: str, reason: str) -> None:
        if self.on_error == "fail":
            raise FeatcacheError(f"cannot read {sample_name(sample)}: {reason}")
        self.items.append((sample, digest, reason))

    def extend(self, items: list[tuple[Sample, str, str]]) -> None:
        for sample, digest, reason in items:
            self.add(sample, digest, reason)

    def keys(self) -> set[str]:
        return {s.key for s, _, _ in self.items}

    def __len__(self) -> int:
        return len(self.items)


def sample_name(s: Sample) -> str:
    """How an error names a sample: its file, or its key when it lives inside a shard or an array."""
    return s.key if (s.member or s.index >= 0 or s.digest or not s.label) else (s.path or s.key)


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
