"""Deterministic, stable train/val/test assignment.

A sample's split is a pure function of its content digest (or of its group id, so related images stay
together) and the fractions: no shuffle, no path, no seed. Adding images, removing others or moving the
folder never moves an existing image to another split, and identical images can never straddle splits.
"""

from __future__ import annotations

import hashlib
import re

from pipeline.utils.config import SPLITS

#: a split's code in the cache's ``split`` column: its position in ``SPLITS``
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}


def group_of(key: str, pattern: re.Pattern[str] | None) -> str | None:
    """A sample's group from ``data.group_pattern``: the match's first group (or the whole match), else None."""
    if pattern is None:
        return None
    m = pattern.search(key)
    if not m:
        return None
    return m.group(1) if m.groups() else m.group(0)


def unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from ``text``."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2.0**64


def assign_split(
    digest: str, *, fixed: str | None, group: str | None, val_fraction: float, test_fraction: float
) -> str:
    """``fixed`` is the layout's word: train/val/test, or trainval (only the test set is given, so the
    rest is split into train and val with ``val_fraction`` of it going to val)."""
    if fixed in SPLIT_CODES:
        return fixed
    u = unit_hash(group if group is not None else digest)
    if fixed == "trainval":
        return "val" if u < val_fraction else "train"
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


#: a class with fewer rows than this in the val or test split (a multi-label class: fewer positives) makes
#: that split's per-class numbers noise: ``train`` says so in its notes, ``extract`` in its summary
SMALL_SPLIT_ROWS = 5


def class_counts(labels, split, class_names) -> dict[str, dict[str, int]]:
    """Split → class → rows of that class, for every split in ``SPLITS`` order; with multi-hot ``labels``
    (a multi-label cache, N × classes) each class's positives."""
    import numpy as np

    labels, split = np.asarray(labels), np.asarray(split)
    out = {}
    for name, code in SPLIT_CODES.items():
        part = labels[split == code]
        if labels.ndim == 2:
            n = part.sum(axis=0) if len(part) else np.zeros(len(class_names), int)
        else:
            n = np.bincount(part.astype(np.int64), minlength=len(class_names))
        out[name] = {c: int(k) for c, k in zip(class_names, n, strict=False)}
    return out


def small_split_note(counts: dict[str, dict[str, int]]) -> str | None:
    """One line naming the classes with fewer than :data:`SMALL_SPLIT_ROWS` rows (multi-label: positives) in
    a non-empty val or test split of :func:`class_counts` (splits stay as they are: stable), or None."""
    small = []
    for name in ("val", "test"):
        part = counts.get(name, {})
        if not sum(part.values()):
            continue
        for cname, n in part.items():
            if n < SMALL_SPLIT_ROWS and any(c.get(cname) for c in counts.values()):
                small.append(f"{cname} ({n} in {name})")
    if not small:
        return None
    shown = ", ".join(small[:6]) + (f" and {len(small) - 6} more" if len(small) > 6 else "")
    return (
        f"classes too small for their split: {shown}; their val/test numbers are noise "
        "(splits stay stable): `featcache search --cv 5` scores on folds of train+val instead"
    )


def split_counts(split, labels, class_names) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Rows per split (``SPLITS`` order) and their :func:`class_counts`, of cache columns (split codes and
    labels, one per row)."""
    import numpy as np

    split = np.asarray(split, np.int64)
    per_split = {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}
    return per_split, class_counts(labels, split, class_names)


def split_lines(per_split: dict[str, int], counts: dict[str, dict[str, int]]) -> list[str]:
    """A summary's lines for :func:`split_counts`: the rows of each split, then :func:`small_split_note`."""
    lines = ["splits: " + " · ".join(f"{n} {name}" for name, n in per_split.items())] if per_split else []
    small = small_split_note(counts)
    return lines + ([f"warning: {small}"] if small else [])


def small_class_note(labels, split, class_names) -> str | None:
    """:func:`small_split_note` of a single-label cache's ``labels`` and ``split`` columns."""
    return small_split_note(class_counts(labels, split, class_names))
