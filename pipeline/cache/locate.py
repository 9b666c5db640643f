"""Where things are: the cache a stage works on, the runs folder beside it, the run a stage starts from.

**Which cache** (:func:`select_cache`, used by train, search, finetune, export and every later stage):

1. ``train.cache`` (``--cache FILE``) names the file: that one.
2. Otherwise the newest complete cache (by modification time; ``extract`` touches the cache it made or
   found, even when nothing changed) in ``extract.cache_dir`` that agrees with every setting the user
   *chose* (:func:`pipeline.utils.config.given_keys`): the dataset (``--data``/``data.name``; none named =
   any dataset), and each of ``--backbone``, ``--weights``, ``--layer``, ``--pooling``, ``--image-size``,
   ``--resize``, ``extract.dtype``, ``extract.precision`` and ``extract.engine`` (``tflite-int8`` selects
   the int8 caches, ``tflite-dynamic`` the dynamic-range ones, any other engine the float ones). Settings left at their defaults do not filter, so
   the stages follow the cache the user just made; settings given select exactly the caches that have them.

The choice is said in one line (:attr:`CacheChoice.note`), with how to pick another.

**Which run** (:func:`resolve_run`, for every command that takes one): a run folder, a run id or a unique
prefix of one, looked for where runs are written (:func:`run_roots`); none named, the newest finished run of
the selected cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache.fingerprint import (
    engine_key,
    engine_selects,
    feature_key,
    fingerprint,
    keyed_engine,
    remember_weights_digest,
    views_key,
    weights_digest,
)
from pipeline.cache.store import cache_stem
from pipeline.data.sources import Dataset, load_dataset
from pipeline.features.backbones.registry import get_spec
from pipeline.features.calibration import Calibration, for_config
from pipeline.utils.config import Config, given_keys
from pipeline.utils.errors import FeatcacheError

#: config keys that pick a cache (extract's selection flags), with the cache attribute each one matches
SELECTION_KEYS = {
    "backbone.name": "backbone",
    "backbone.weights": "weights",
    "backbone.layers": "layers",
    "backbone.pooling": "pooling",
    "backbone.image_size": "image_size",
    "backbone.resize": "resize",
    "extract.dtype": "dtype",
    "extract.precision": "precision",
    "extract.engine": "engine",
}

#: how to pick another cache, said with every automatic choice
PICK_ANOTHER = "--cache FILE, or --data/--image-size/--weights/--layer/--pooling/--resize to pick another"


@dataclass
class CacheChoice:
    path: Path
    note: str = ""  # one line: which cache was taken and how to pick another ("" when --cache named it)
    meta: dict[str, Any] | None = None


def dataset_name(data) -> str:
    """The name a dataset's caches carry, without listing its files; a missing source is an error."""
    src = data.source.strip()
    if data.name:
        name = data.name
    elif src in ("fashion_mnist", "fashion-mnist"):
        return "fashion_mnist"
    else:
        p = Path(src).expanduser()
        if not p.exists():
            raise FeatcacheError(f"data source not found: {src}")
        name = p.name if p.is_dir() else p.stem  # as pipeline.data.sources names it
    return name


def cache_attrs(path: Path) -> dict[str, Any] | None:
    """A complete cache's attributes (no rows read), or None for anything else."""
    from pipeline.cache.h5 import attr_value, h5py_module

    try:
        with h5py_module().File(path, "r") as f:
            if not bool(f.attrs.get("complete", False)):
                return None
            return {k: attr_value(v) for k, v in f.attrs.items()}
    except OSError:
        return None


def _agrees(cfg: Config, key: str, meta: dict[str, Any]) -> bool:
    section, name = key.split(".")
    want = getattr(getattr(cfg, section), name)
    have = meta.get(SELECTION_KEYS[key])
    if key == "backbone.name":
        return have == get_spec(want).name
    if key == "backbone.layers":
        return set(want) <= set(have or [])
    if key in ("extract.engine", "extract.precision"):  # in the feature key only where they change features
        feature_key = meta.get("feature_key") or {}
        if key == "extract.engine":
            return keyed_engine(feature_key) == engine_selects(want)
        return feature_key.get("precision", "float32") == want
    if key == "backbone.image_size":
        return have == (want or get_spec(meta.get("backbone", cfg.backbone.name)).default_size)
    if key == "backbone.weights" and want not in ("imagenet", "none"):
        from pipeline.utils.io import sha256_file

        p = Path(want).expanduser()
        if not p.is_file():
            raise FeatcacheError(f"--weights: file not found: {want} (use imagenet, none, or a weights file)")
        return meta.get("weights_digest") == "sha256:" + sha256_file(p)
    return have == want


def _describe(meta: dict[str, Any]) -> str:
    return f"{meta.get('dataset')}, {meta.get('backbone')}, {meta.get('image_size')} px"


def select_cache(cfg: Config) -> CacheChoice:
    """The cache a later stage works on; see the module docstring for the rule."""
    if cfg.train.cache:
        path = Path(cfg.train.cache).expanduser()
        if not path.is_file():
            raise FeatcacheError(f"--cache: no cache at {path}: run `featcache extract` first")
        return CacheChoice(path.resolve())
    given = given_keys(cfg)
    dataset = dataset_name(cfg.data) if given & {"data.source", "data.name"} else None
    keys = [k for k in SELECTION_KEYS if k in given]
    root = Path(cfg.extract.cache_dir).expanduser()
    found = []
    for p in sorted(root.glob("*.h5")) if root.is_dir() else []:
        meta = cache_attrs(p)
        if meta is None or str(meta.get("source", "")).endswith(("<paths>", "<array>")):
            continue  # not a finished cache, or FeatureExtractor's own (images, not a dataset)
        if dataset is None or meta.get("dataset") == dataset:
            found.append((p.stat().st_mtime_ns, p, meta))
    of = f"of dataset {dataset} " if dataset else ""
    if not found:
        hint = f" --data {cfg.data.source}" if dataset else " --data PATH"
        raise FeatcacheError(f"no cache {of}in {root.resolve()}: run `featcache extract{hint}` first")
    matching = [f for f in found if all(_agrees(cfg, k, f[2]) for k in keys)]
    if not matching:
        chosen = ", ".join(
            f"{k.split('.')[1]}={getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])}" for k in keys
        )
        there = "; ".join(sorted({_describe(m) for _, _, m in found}))
        raise FeatcacheError(
            f"no cache {of}in {root.resolve()} has {chosen} (there are: {there}): run `featcache extract`"
            " with the same settings first, or drop them to take the newest"
        )
    _, path, meta = max(matching, key=lambda f: (f[0], str(f[1])))
    which = "newest cache" + (f" of {dataset}" if dataset else " in the cache folder")
    if keys:
        which += " with the settings given"
    note = f"cache: {path.resolve()} ({which}: {_describe(meta)}; {PICK_ANOTHER})"
    return CacheChoice(path.resolve(), note, meta)


def touch_cache(path: Path) -> None:
    """Mark ``path`` as the cache just made (the newest), even when extraction had nothing to do."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache folder still serves; it just does not become the newest


def resolve_cache_path(
    cfg: Config, ds: Dataset | None = None, calibration: Calibration | None = None
) -> tuple[Path, dict[str, Any], Dataset]:
    """Where ``cfg``'s cache lives (building nothing when the weights digest is known without the model).

    ``calibration``: a ``tflite-int8`` engine's calibration set (default: a sample of ``ds``'s train images).
    """
    spec = get_spec(cfg.backbone.name)
    ds = ds if ds is not None else load_dataset(cfg.data, Path(cfg.extract.cache_dir) / "shards")
    calibration = calibration if calibration is not None else for_config(cfg, ds)
    digest = weights_digest(spec, cfg.backbone.weights, cfg.backbone.layers, cfg.extract.cache_dir)
    if digest is None:
        from pipeline.features.backbones.build import build_feature_model

        digest = build_feature_model(cfg.backbone).weights_digest()
        remember_weights_digest(spec, cfg.backbone.layers, cfg.extract.cache_dir, digest)
    key = engine_key(cfg, feature_key(cfg, spec, digest, decodes=ds.is_files), calibration)
    key = views_key(cfg, key)  # views change the rows
    return Path(cfg.extract.cache_dir) / (cache_stem(ds.name, spec.name, fingerprint(key)) + ".h5"), key, ds


def resolve_cache(cfg: Config) -> Path:
    """The cache a later stage works on (:func:`select_cache`); it exists."""
    return select_cache(cfg).path


def runs_root(cfg: Config, cache_path: Path) -> Path:
    """``train.runs_dir``, else ``runs/`` next to the cache file."""
    root = Path(cfg.train.runs_dir).expanduser() if cfg.train.runs_dir else Path(cache_path).parent / "runs"
    return root.resolve()  # printed paths are absolute


def run_roots(cfg: Config) -> list[Path]:
    """Where a run named by id is looked for: ``train.runs_dir``; else where runs of the cache the stage
    selected (``train.cache``, ``--cache``) are written (:func:`runs_root`), then ``<extract.cache_dir>/runs``."""
    roots = []
    if cfg.train.runs_dir or cfg.train.cache:
        roots.append(runs_root(cfg, Path(cfg.train.cache).expanduser()))
    if not cfg.train.runs_dir:
        roots.append((Path(cfg.extract.cache_dir).expanduser() / "runs").resolve())
    return roots


def resolve_run(cfg: Config, name: str | Path | None = None, *, finetuned: bool = True) -> Path:
    """The run a command takes (``--run``, ``--model``, ``runs show``, ``finetune.run``): a run folder, an id
    or a unique id prefix (:func:`pipeline.utils.runs.find_run` under :func:`run_roots`); none named: the
    newest finished run of the selected cache (stage 2 only unless ``finetuned``)."""
    from pipeline.utils.runs import find_run, finished_runs

    if name:
        return find_run(name, run_roots(cfg))
    cache = resolve_cache(cfg)
    root = runs_root(cfg, cache)
    found = finished_runs(root, cache, finetuned)
    if found:
        return found[0].resolve()
    of = f" of {cache}" if finetuned or finished_runs(root, finetuned=False) else ""
    then = " (and `featcache finetune`)" if finetuned else ""
    raise FeatcacheError(f"no finished runs{of} in {root}: run `featcache train`{then} first")
