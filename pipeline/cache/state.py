"""A cache's *state*: per split, how many rows it has and a digest of which rows (content ids) with which
labels. A run records the state it was trained and scored on (``metrics.json`` → ``cache.state``); a run
whose recorded val or test state differs from the cache's current one was scored on other data (the
cache grew or changed) and is *stale*: :func:`pipeline.utils.runs.run_status` compares the two.

Cheap: the ids and labels are already in memory once a cache is open (:class:`FeatureCache`), no feature is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.config import SPLITS
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import SEARCH_PREFIX, list_runs, read_metrics

STATE_BLOCK = 1 << 18  # rows hashed at a time: memory stays at a block's lines, whatever the cache's size


def cache_state(cache) -> dict[str, dict[str, Any]]:
    """``{split: {"n": rows, "digest": "sha256:..."}}`` for train, val and test of an open cache.

    The digest hashes the split's rows sorted by content id, each with its label *names* (so a class
    added elsewhere, which renumbers the classes, does not change a split whose rows did not change);
    file names and row order do not count: a moved or re-listed folder keeps its state.
    """
    names = np.asarray([str(c).encode("utf-8") for c in cache.class_names] or [b""], dtype="S")
    ids = np.asarray(
        cache.ids.raw if hasattr(cache.ids, "raw") else [str(i).encode() for i in cache.ids], "S"
    )
    out = {}
    for i, split in enumerate(SPLITS):
        rows = np.flatnonzero(cache.split == i)
        if cache.multilabel:
            labels = np.asarray(
                [b" ".join(names[np.flatnonzero(cache.labels[r])].tolist()) for r in rows], dtype="S"
            )
        else:
            labels = names[cache.labels[rows]]
        h = hashlib.sha256()
        order = np.lexsort((labels, ids[rows])) if len(rows) else rows
        for lo in range(0, len(order), STATE_BLOCK):  # "<content id>\t<label names>\n", sorted, in blocks
            at = order[lo : lo + STATE_BLOCK]
            lines = np.char.add(np.char.add(ids[rows[at]], b"\t"), np.char.add(labels[at], b"\n"))
            h.update(b"".join(lines.tolist()))
        out[split] = {"n": int(len(rows)), "digest": "sha256:" + h.hexdigest()}
    return out


def read_state(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """A cache file's attributes and :func:`cache_state`, or None when it is gone or unreadable."""
    from pipeline.cache.store import FeatureCache

    try:
        with FeatureCache(path) as cache:
            return dict(cache.meta), cache_state(cache)
    except FeatcacheError:
        return None


def runs_of_cache(root: str | Path, cache_path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``root``'s runs made from the cache at ``cache_path`` (:func:`pipeline.utils.runs.run_of_cache`),
    each marked current or stale against the cache as it is now."""
    found = read_state(cache_path)
    meta, state = found if found else ({}, None)
    return list_runs(root, meta.get("fingerprint"), cache=cache_path, state=state)


def cache_file(recorded: dict[str, Any], cache_dirs: Sequence[str | Path]) -> Path | None:
    """The cache file a run was made from (``recorded``: what its metrics say of its cache): by its file
    name in ``cache_dirs`` (a moved cache folder), then at the path it recorded; None when it is gone."""
    if not recorded.get("path"):
        return None
    name = Path(str(recorded["path"])).name
    places = [Path(d).expanduser() / name for d in cache_dirs] + [Path(str(recorded["path"]))]
    return next((p.resolve() for p in places if p.is_file()), None)


def run_state(run_dir: str | Path, cache_dirs: Sequence[str | Path]) -> dict[str, dict[str, Any]] | None:
    """The current state of the cache a run was made from (:func:`cache_file`), None when it is gone."""
    run_dir = Path(run_dir)
    found_in = [
        *cache_dirs,
        run_dir.parent.parent,
        run_dir.parent.parent.parent,
    ]  # <cache dir>/runs/[finetune/]<id>
    recorded = _recorded_cache(run_dir)
    path = cache_file(recorded, found_in)
    found = read_state(path) if path else None
    return found[1] if found else None


def _recorded_cache(folder: Path) -> dict[str, Any]:
    """What a run's ``metrics.json`` or a search's ``search.json`` says of its cache."""
    if not folder.name.startswith(SEARCH_PREFIX):
        return read_metrics(folder, missing_ok=True).cache
    try:
        info = json.loads((folder / "search.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info.get("cache") or {} if isinstance(info, dict) else {}


@dataclass
class CacheRuns:
    """The runs in a runs folder made from one cache (``runs ls --all``): its file name, what it is, its runs."""

    name: str
    info: dict[str, Any]  # dataset, source, backbone, image_size: the cache's, else as its runs recorded them
    rows: list[dict[str, Any]]
    found: Path | None  # the cache file, None when it is gone (its runs' staleness is then unknown)


def runs_by_cache(root: str | Path, cache_dirs: Sequence[str | Path]) -> list[CacheRuns]:
    """Every run and search in ``root``, grouped by the cache each was made from (:func:`cache_file`),
    oldest cache group first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in list_runs(root):
        groups.setdefault(row["cache"] or "?", []).append(row)
    out = []
    for name, rows in groups.items():
        recorded = _recorded_cache(Path(rows[0]["path"])) or {"path": name}
        path = cache_file(recorded, cache_dirs) if name != "?" else None
        found = read_state(path) if path else None
        meta, state = found if found else (recorded, None)
        mine = list_runs(root, meta.get("fingerprint"), cache=name, state=state) if name != "?" else rows
        info = {k: meta.get(k) for k in ("dataset", "source", "backbone", "image_size")}
        out.append(CacheRuns(name, info, mine, path if found else None))
    return out


def searched_data(fingerprint: str, state: dict[str, dict[str, Any]]) -> str:
    """What a search's trials are keyed by (its folder and its journal): the cache's fingerprint and the
    train and val rows it reads, so a search run again after the cache grew starts afresh instead of
    reusing trials scored on the old rows."""
    rows = "|".join(state[s]["digest"] for s in ("train", "val"))
    return f"{fingerprint}:{hashlib.sha256(rows.encode()).hexdigest()[:16]}"
