"""One run of ``extract``: its state handed from step to step, its result, and the timed backbone pass."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache.quarantine import Unreadable
from pipeline.cache.schema import part_manifest
from pipeline.cache.store import FeatureCache
from pipeline.cache.write import (
    PartRows,
    PartWriter,
    scan_parts,
)
from pipeline.data.sources import Dataset, Sample
from pipeline.data.splits import split_lines
from pipeline.features.calibration import Calibration
from pipeline.utils.config import Config

GROWTH = {
    "segment": "cache grew by a segment: only the new rows were written",
    "merged": "cache grew by a segment: only the new rows were written, and the segments merged into one",
}


@dataclass
class ExtractResult:
    path: Path
    rows: int = 0  # samples in the cache now
    extracted: int = 0  # ran through the backbone in this run
    reused: int = 0  # served from the previous cache or from parts of an interrupted run
    donated: int = 0  # of those, copied by content from another cache of the same features (``donors``)
    donors: list[Path] = field(default_factory=list)  # the other caches rows were copied from
    skipped: int = 0  # unreadable, listed in the quarantine file
    removed: int = 0  # were cached, no longer in the dataset
    ignored: int = 0  # non-image or hidden files seen while scanning
    batches: int = 0  # backbone forward passes
    engine: str = ""  # which runtime ran the backbone in this run (empty: none ran)
    engine_why: str = ""  # why ``auto`` chose it, when it says; a transformer's hint at tflite-dynamic
    engine_fidelity: dict[str, Any] = field(default_factory=dict)  # tflite-dynamic: its gate's figures
    seconds: float = 0.0
    backbone_seconds: float = 0.0
    quarantine: Path | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: int = 0  # multi-label rows with no class (all negative)
    device: str = ""  # where the backbone ran in this run: "CPU" or "GPU (its name)" (empty: none ran)
    splits: dict[str, int] = field(default_factory=dict)  # rows in the cache now: train, val, test
    written: str = ""  # what the cache file got: unchanged, segment, merged or rewritten
    class_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # split → class → rows (positives)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.backbone_seconds if self.backbone_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"cache: {self.path}",
            f"samples: {self.rows} in cache · {self.extracted} extracted · {self.reused} reused · "
            f"{self.skipped} skipped · {self.removed} removed"
            + (f" · {self.ignored} non-image files ignored" if self.ignored else "")
            + (f" · {self.unlabelled} with no label" if self.unlabelled else ""),
        ]
        if self.donated:
            lines.append(
                f"reused by content: {self.donated} rows from {', '.join(p.name for p in self.donors)}"
                " (the same images, seen in another source's cache)"
            )
        if self.extracted:
            lines.append(
                f"speed: {self.images_per_second:.1f} images/s on {self.engine or '?'} "
                f"({self.device or '?'}, {self.batches} batches, {self.seconds:.1f} s total)"
                + (f"\n  ({self.engine_why})" if self.engine_why else "")
            )
        else:
            lines.append(f"no backbone work ({self.seconds:.2f} s)")
        if self.written in GROWTH:
            lines.append(GROWTH[self.written])
        lines += split_lines(self.splits, self.class_rows)
        lines += [f"skipped files and reasons: {self.quarantine}"] if self.quarantine else []
        return "\n".join(lines)


@dataclass
class ExtractJob:
    """One run of :func:`extract`, handed from step to step: what is extracted into which cache, and what the
    steps found so far (digests, parts, what the backbone still has to see, what could not be read)."""

    cfg: Config
    ds: Dataset
    final: Path  # the complete cache file this run brings up to date
    key: dict[str, Any]  # the feature key; ``fp`` is its fingerprint
    fp: str
    old: FeatureCache | None  # the previous complete cache (None: there is none, or --rebuild)
    result: ExtractResult
    unreadable: Unreadable
    calibration: Calibration | None = None  # tflite-int8: calibrated on it; tflite-dynamic: gated on it
    bar: Any = None  # a progress bar shared with other extractions (compare's), else one of its own
    model: Any = None  # a FeatureModel built for ``cfg`` already (compare's check), else built here
    #: sample key → (content digest, size, mtime)
    digests: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)  # digests the previous cache holds
    parts: dict[str, PartRows] = field(default_factory=dict)  # digests in an interrupted run's parts
    pending: list[Sample] = field(default_factory=list)  # samples the backbone has to see in this run
    donors: list[FeatureCache] = field(default_factory=list)  # other caches of ``fp`` that serve rows
    share: bool = True  # rows may come from ``donors`` (not with --rebuild)
    donated: set[str] = field(default_factory=set)  # digests served by ``donors``
    narrowed: bool = False  # ``ds`` holds only the files ``old`` lacks (every cached row is kept as it is)

    def digest(self, s: Sample) -> str:
        return self.digests[s.key][0]

    def cannot_read(self, s: Sample, reason: str) -> None:
        self.unreadable.add(s, self.digest(s), reason)

    def part_writer(self, dims: dict[str, int]) -> PartWriter:
        return PartWriter(self.final, part_manifest(self.fp, self.key, self.ds, dims))

    def rescan_parts(self) -> None:
        self.parts = scan_parts(self.final, self.fp)


@contextlib.contextmanager
def backbone_pass(job: ExtractJob, total: int):
    """A progress bar over ``total`` images; the time the pass takes counts as backbone time."""
    from tqdm import tqdm

    enabled = job.cfg.extract.progress
    progress = job.bar or tqdm(
        total=total, unit="img", desc="extract", disable=not enabled, dynamic_ncols=True, smoothing=0.1
    )
    t0 = time.perf_counter()
    try:
        yield progress
    finally:
        if progress is not job.bar:
            progress.close()
        job.result.backbone_seconds += time.perf_counter() - t0
