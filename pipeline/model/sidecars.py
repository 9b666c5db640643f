"""What the JSON beside a model file says about it: ``export.json`` (written by ``featcache export``) and
``metrics.json`` (a run's), read by predict for class names, the input size, the resize and decode policy.

They may come from anyone with the model, so every value is checked before it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.utils.errors import FeatcacheError


def sidecars_near(path: Path):
    """The parsed ``export.json`` / ``metrics.json`` files beside a model file (or folder) and one level up."""
    for _, info in _sidecar_files(path):
        yield info


def class_names_near(path: Path, n: int) -> list[str]:
    for info in sidecars_near(path):
        names = info.get("class_names")
        if isinstance(names, list) and len(names) == n:
            return [str(x) for x in names]
    return [str(i) for i in range(n)]


def decode_near(path: Path) -> str:
    """The ``data.decode`` policy a sidecar records for a model; ``exact`` for models from before it."""
    from pipeline.utils.config import DECODE_POLICIES

    for info in sidecars_near(path):
        if info.get("decode") in DECODE_POLICIES:
            return str(info["decode"])
    return "exact"


def thresholds_near(path: Path, names: list[str]) -> list[float] | None:
    """A multi-label model's per-class thresholds (in ``names`` order) from the first sidecar beside it that
    names its classes; None for a single-label model. A sidecar that says multi-label is checked."""
    for f, info in _sidecar_files(path):
        if info.get("class_names") == names or "thresholds" in info or "task" in info:
            return sidecar_thresholds(info, names, f)
    return None


def _sidecar_files(path: Path):
    """(file, parsed dict) of :func:`sidecars_near`'s files, in its order."""
    for d in (path.parent if path.is_file() else path, (path.parent if path.is_file() else path).parent):
        for name in ("export.json", "metrics.json"):
            f = d / name
            if f.is_file():
                try:
                    info = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(info, dict):
                    yield f, info


def sidecar_thresholds(info: dict[str, Any], names: list[str] | None, f: Path) -> list[float] | None:
    """``task`` and ``thresholds`` of a sidecar, checked: None when it is single-label (no ``task``), else a
    threshold in [0, 1] for each of ``names``, in their order (:func:`pipeline.utils.thresholds.checked_thresholds`)."""
    from pipeline.utils.config import MULTILABEL
    from pipeline.utils.thresholds import checked_thresholds

    task, t = info.get("task"), info.get("thresholds")
    if task is None and t is None:
        return None
    return checked_thresholds(t if task == MULTILABEL else None, names, f, "sidecar")


@dataclass
class ExportInfo:
    """What an exported model's ``export.json`` tells predict, checked: it may come from anyone."""

    class_names: list[str] | None = None
    image_size: int | None = None
    resize: str = "stretch"
    thresholds: list[float] | None = None  # a multi-label model's per-class thresholds (class_names order)


def export_info(path: Path) -> ExportInfo:
    """The ``export.json`` beside (or one level above) an exported model; empty when there is none."""
    from pipeline.utils.config import RESIZE_POLICIES

    d = path.parent if path.is_file() else path
    f = next((f for f in (d / "export.json", d.parent / "export.json") if f.is_file()), None)
    if f is None:
        return ExportInfo()
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FeatcacheError(f"{f}: not readable JSON ({str(e)[:120]})") from None
    if not isinstance(info, dict):
        info = {"resize": None}  # refused below, with what an export.json holds
    names, size, resize = info.get("class_names"), info.get("image_size"), info.get("resize", "stretch")
    if (
        (names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)))
        or (size is not None and not (isinstance(size, int) and 0 < size <= 8192))
        or resize not in RESIZE_POLICIES
    ):
        raise FeatcacheError(
            f"{f}: not an export.json featcache wrote (class_names: a list of names, image_size: pixels, "
            f"resize: {'|'.join(RESIZE_POLICIES)})"
        )
    return ExportInfo(names, size, resize, sidecar_thresholds(info, names, f))
