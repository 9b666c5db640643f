"""Where things are: the cache a config describes, the runs folder beside it, the run a stage starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.cache.fingerprint import (
    feature_key,
    fingerprint,
    remember_weights_digest,
    views_key,
    weights_digest,
)
from pipeline.cache.store import cache_stem
from pipeline.data.sources import Dataset, load_dataset
from pipeline.features.backbones.registry import get_spec
from pipeline.utils.config import Config
from pipeline.utils.errors import FeatcacheError


def latest_model_run(root: Path) -> Path:
    """The newest finished run under ``root``: fine-tuned (``root/finetune/*``) or stage 2 (``root/*``)."""
    found = [p.parent for p in root.glob("*/manifest.json")] + [
        p.parent for p in root.glob("finetune/*/manifest.json")
    ]
    if not found:
        raise FeatcacheError(
            f"no finished runs in {root}: run `featcache train` (and `featcache finetune`) first"
        )
    return max(found, key=lambda p: (p / "manifest.json").stat().st_mtime_ns)


def resolve_model_run(cfg, name: str | None) -> Path:
    """A run folder, a run id under the runs folder (stage 2 or ``finetune/``), or the newest run."""

    if name and Path(name).is_dir():
        return Path(name)
    root = Path(cfg.train.runs_dir) if cfg.train.runs_dir else None
    if root is None:
        root = runs_root(cfg, resolve_cache(cfg)) if not name else Path(cfg.extract.cache_dir) / "runs"
    if not name:
        return latest_model_run(root)
    for cand in (root / name, root / "finetune" / name):
        if cand.is_dir():
            return cand
    raise FeatcacheError(f"run not found: {name}")


def resolve_cache_path(cfg: Config, ds: Dataset | None = None) -> tuple[Path, dict[str, Any], Dataset]:
    """Where ``cfg``'s cache lives (building nothing when the weights digest is known without the model)."""
    spec = get_spec(cfg.backbone.name)
    ds = ds if ds is not None else load_dataset(cfg.data, Path(cfg.extract.cache_dir) / "shards")
    digest = weights_digest(spec, cfg.backbone.weights, cfg.backbone.layers, cfg.extract.cache_dir)
    if digest is None:
        from pipeline.features.backbones.build import build_feature_model

        digest = build_feature_model(cfg.backbone).weights_digest()
        remember_weights_digest(spec, cfg.backbone.layers, cfg.extract.cache_dir, digest)
    key = views_key(cfg, feature_key(cfg, spec, digest, decodes=ds.is_files))  # views change the rows
    return Path(cfg.extract.cache_dir) / (cache_stem(ds.name, spec.name, fingerprint(key)) + ".h5"), key, ds


def resolve_source_run(cfg: Config, run: str | None = None) -> Path:
    """``--run`` / ``finetune.run`` (a folder or a run id under the runs folder), else the latest stage-2 run."""
    from pipeline.utils.runs import latest_run

    name = run or cfg.finetune.run
    if name:
        p = Path(name)
        if p.is_dir():
            return p
        root = Path(cfg.train.runs_dir) if cfg.train.runs_dir else Path(cfg.extract.cache_dir) / "runs"
        if (root / name).is_dir():
            return root / name
        raise FeatcacheError(f"run not found: {name}")
    return latest_run(runs_root(cfg, resolve_cache(cfg)))


def resolve_cache(cfg: Config) -> Path:
    """``train.cache`` if set, else the cache that ``[data]`` + ``[backbone]`` describe; it must exist."""
    if cfg.train.cache:
        path = Path(cfg.train.cache)
    else:
        path = resolve_cache_path(cfg)[0]
    if not path.is_file():
        raise FeatcacheError(f"no cache at {path}: run `featcache extract` first")
    return path


def runs_root(cfg: Config, cache_path: Path) -> Path:
    """``train.runs_dir``, else ``runs/`` next to the cache file."""
    return Path(cfg.train.runs_dir) if cfg.train.runs_dir else Path(cache_path).parent / "runs"


def find_run(root: Path, name: str) -> Path:
    """A run, fine-tuned run or search by folder, by id under ``root`` (or ``root/finetune``), or by a unique
    prefix of its id."""
    from pipeline.utils.runs import run_folders

    if Path(name).is_dir():
        return Path(name)
    for cand in (root / name, root / "finetune" / name):
        if cand.is_dir():
            return cand
    matches = [p for p in run_folders(root) if p.name.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(p.name for p in matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise FeatcacheError(f"run {name!r} is ambiguous: {len(matches)} runs start with it ({shown})")
    raise FeatcacheError(f"run not found: {name} (in {root}; `featcache runs ls` lists them)")
