"""Run folders: where a fitted head, its metrics and its plots live, and how a model is loaded back.

``<runs>/<id>/`` holds the model (``model.joblib``; or ``transforms.joblib`` + ``head.keras`` +
``head.json`` for Keras heads), ``metrics.json``, plots and ``misclassified.csv``. ``manifest.json`` is
written last with the sha256 of every other file: a folder without it is an unfinished run, and
:func:`load_model` refuses any file whose bytes changed. That catches truncation and accidental edits before
anything is unpickled; it is not a signature, so only load runs from places you trust.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import sha256_file, write_json

MANIFEST = "manifest.json"


RUN_FORMAT = "featcache-run/1"


def new_run_dir(root: str | Path, head: str) -> Path:
    """``<root>/20261124-173000-logistic-ab12``: sortable by time, unique across concurrent runs."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatcacheError(f"runs folder {root}: cannot create ({e.strerror})") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        d = root / f"{stamp}-{head}-{secrets.token_hex(2)}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise FeatcacheError(f"runs folder {root}: cannot find a free run id")  # pragma: no cover


def latest_run(root: str | Path) -> Path:
    """The newest complete run (one with a manifest) under ``root``."""
    runs = sorted(p.parent for p in Path(root).glob(f"*/{MANIFEST}"))
    if not runs:
        raise FeatcacheError(f"no finished runs in {root}: run `featcache train` first")
    return runs[-1]


def write_manifest(run_dir: Path, kind: str, model_files: Sequence[str]) -> dict[str, Any]:
    """Hash every file in the run folder (the model's and the reports'); written last, atomically."""
    files = {}
    for p in sorted(run_dir.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format": RUN_FORMAT,
        "kind": kind,
        "model_files": list(model_files),
        "files": files,
        "created": time.time(),
    }
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def verify_run(run_dir: str | Path) -> dict[str, Any]:
    """Check every listed file against its sha256; raise naming the first one that differs or is missing."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise FeatcacheError(f"run folder not found: {run_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatcacheError(
            f"{run_dir}: no {MANIFEST}; the run did not finish or is not a featcache run"
        ) from None
    except (OSError, ValueError) as e:
        raise FeatcacheError(f"{path}: unreadable manifest ({e}); refusing to load this run") from None
    if manifest.get("format") != RUN_FORMAT or not isinstance(manifest.get("files"), dict):
        raise FeatcacheError(f"{path}: not a {RUN_FORMAT} manifest")
    for name, info in manifest["files"].items():
        p = run_dir / name
        if not p.is_file():
            raise FeatcacheError(f"{p}: listed in the manifest but missing; refusing to load this run")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise FeatcacheError(
                f"{p}: {size} bytes, manifest says {info.get('bytes')} (truncated or replaced); refusing to load"
            )
        if sha256_file(p) != info.get("sha256"):
            raise FeatcacheError(
                f"{p}: sha256 differs from the manifest (file modified or corrupted); refusing to load"
            )
    for name in manifest.get("model_files", []):
        if name not in manifest["files"]:
            raise FeatcacheError(f"{path}: model file {name} is not covered by the manifest")
    return manifest
