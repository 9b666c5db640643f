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


#: a class with fewer rows than this in the val or test split makes that split's per-class numbers noise
SMALL_SPLIT_ROWS = 5


def small_class_note(labels, split, class_names) -> str | None:
    """One line when a class is too small for its val/test split (splits stay as they are: stable), or None."""
    import numpy as np

    labels, split = np.asarray(labels), np.asarray(split)
    small = []
    for code, name in ((1, "val"), (2, "test")):
        part = labels[split == code]
        if not len(part):
            continue
        for c, cname in enumerate(class_names):
            n = int((part == c).sum())
            if n < SMALL_SPLIT_ROWS and (labels == c).any():
                small.append(f"{cname} ({n} in {name})")
    if not small:
        return None
    shown = ", ".join(small[:6]) + (f" and {len(small) - 6} more" if len(small) > 6 else "")
    return (
        f"classes too small for their split: {shown}; their val/test numbers are noise "
        "(splits stay stable): `featcache search --cv 5` scores on folds of train+val instead"
    )
