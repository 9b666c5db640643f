"""Growth without rewriting: the rows a run adds to a complete cache go to a segment file next to it.

    <name>.h5                                   the base: a complete cache, as every version wrote it
    <name>.segments/seg-<first>-<last>.h5       rows added by later runs ``first``..``last`` (numbered from 1)

A segment is a complete cache file of its own (same layout, checksums, ``complete`` written last, renamed
into place whole) that names the base it extends: ``segment_of`` is the base's *generation* (a random id
each full write gives the base; a base written before segments existed is known by its ``attrs_sha256``).
A reader serves the base followed by the chain of segments that starts at run 1 and goes on without a gap,
taking at each step the segment that reaches furthest (a merge of runs 1..16 supersedes runs 1, 2, ...).
So a file of another generation (left by a rewrite that was killed before it removed the old segments), a
superseded one (a merge killed before its clean-up) or a half-written one (a temporary name) is never
served, and every state a reader can see is one a run completed. Writers: :mod:`pipeline.cache.growth`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEGMENT_NAME = re.compile(r"^seg-(\d{6})-(\d{6})\.h5$")


def segment_dir(final: Path) -> Path:
    return final.with_name(final.stem + ".segments")


def segment_name(first: int, last: int) -> str:
    return f"seg-{first:06d}-{last:06d}.h5"


def base_generation(meta: dict) -> str | None:
    """What a segment names to extend this base: its generation, else (written before segments) its
    attributes' digest; None for a file with neither (so old that growth rewrites it once)."""
    return meta.get("generation") or meta.get("attrs_sha256")


@dataclass(frozen=True)
class SegmentFile:
    path: Path
    first: int
    last: int


def segment_files(final: Path) -> list[SegmentFile]:
    """Every segment-named file next to ``final``, sorted by first run, the widest first."""
    d = segment_dir(final)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = SEGMENT_NAME.match(p.name)
        if m and int(m[1]) <= int(m[2]):
            found.append(SegmentFile(p, int(m[1]), int(m[2])))
    return sorted(found, key=lambda s: (s.first, -s.last))


def chain(files: list[SegmentFile], belongs) -> list[SegmentFile]:
    """The segments served: from run 1, each step the widest file that ``belongs`` (opens as a segment of
    this base), until a gap."""
    out: list[SegmentFile] = []
    start = 1
    while True:
        step = next((s for s in files if s.first == start and belongs(s)), None)
        if step is None:
            return out
        out.append(step)
        start = step.last + 1


class StackedRows:
    """One layer's feature matrix over the base and its segments, read like the h5py dataset it replaces:
    ``shape``, ``dtype``, ``x[()]``, ``x[lo:hi]`` and ``x[increasing rows]``."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.chunks = parts[0].chunks

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if key is Ellipsis or (isinstance(key, tuple) and key == ()):
            return self[0 : self.shape[0]]
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("stacked rows: slices with a step are not supported")
            return self._rows(np.arange(lo, max(lo, hi)), contiguous=True)
        return self._rows(np.asarray(key, dtype=np.int64), contiguous=False)

    def _rows(self, rows: np.ndarray, contiguous: bool) -> np.ndarray:
        which = np.searchsorted(self.starts, rows, side="right") - 1
        blocks = []
        for k in np.unique(which):
            local = rows[which == k] - self.starts[k]
            part = self.parts[int(k)]
            blocks.append(part[int(local[0]) : int(local[-1]) + 1] if contiguous else part[local])
        if not blocks:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.concatenate(blocks) if len(blocks) > 1 else np.asarray(blocks[0])
