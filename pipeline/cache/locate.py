"""Where things are: the cache a stage works on, the runs folder beside it, the run a stage starts from.

**Whose cache.** A cache belongs to one source: its file name carries a tag of the source's identity
(:func:`pipeline.cache.fingerprint.source_identity`: the resolved path or the URL), and its ``source_id``
attribute the identity itself, so two folders both named ``imgs`` never share, rebuild or drop each
other's rows. Rows stay keyed by content: a moved, renamed or copied source gets a cache of its own whose
rows are copied from the other caches of the same features (:func:`open_donors`), never extracted twice.
A cache written before caches recorded their source is matched by its name, as then, unless the source it
recorded still exists and is another one (:func:`belongs`); ``extract`` records its source once.

**Which cache** (:func:`select_cache`, used by train, search, finetune, export and every later stage):

1. ``train.cache`` (``--cache FILE``) names the file: that one.
2. Otherwise the newest complete cache (by modification time; ``extract`` touches the cache it made or
   found, even when nothing changed) in ``extract.cache_dir`` of the source ``--data`` names (none named =
   any source), agreeing with each of ``--backbone``, ``--weights``, ``--layer``, ``--pooling``,
   ``--image-size``, ``--resize``, ``extract.dtype``, ``extract.precision`` and ``extract.engine``
   (``tflite-int8`` selects the int8 caches, ``tflite-dynamic`` the dynamic-range ones, any other engine
   the float ones) that the user *chose*
   (:func:`pipeline.utils.config.given_keys`). Settings left at their defaults do not filter, so the stages
   follow the cache the user just made of that data; settings given select exactly the caches that have them.

The choice is said in one line (:attr:`CacheChoice.note`) naming the cache's source and settings, with how
to pick another.

**Which run** (:func:`resolve_run`, for every command that takes one): a run folder, a run id or a unique
prefix of one, looked for where runs are written (:func:`run_roots`); none named, the newest finished run of
the selected cache. When it has none, :func:`no_runs_error` names another cache of the same source that has
runs, and the flags that select it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache.fingerprint import (
    BUILTIN_IDENTITY,
    BUILTIN_SOURCES,
    engine_key,
    engine_selects,
    feature_key,
    fingerprint,
    keyed_engine,
    remember_weights_digest,
    source_identity,
    source_tag,
    views_key,
    weights_digest,
)
from pipeline.cache.store import FeatureCache, cache_stem
from pipeline.data.sources import Dataset, load_dataset
from pipeline.data.storage import is_url
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
    elif src in BUILTIN_SOURCES:
        return BUILTIN_IDENTITY
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


def belongs(meta: dict[str, Any], identity: str, dataset: str) -> bool:
    """Whether a cache was made from the source ``identity`` (named ``dataset``).

    A cache records its source's identity (``source_id``). One written before it did is matched by its
    name, as it was then, unless the source it recorded is another one that still exists: that cache
    belongs to it, and is never rebuilt for, or served as, this one."""
    if "source_id" in meta:
        return meta["source_id"] == identity
    if meta.get("dataset") != dataset:
        return False
    recorded = str(meta.get("source") or "")
    if not recorded or identity == BUILTIN_IDENTITY or source_identity(recorded) == identity:
        return True
    return not (is_url(recorded) or os.path.exists(recorded))


def dataset_identity(cfg: Config, ds: Dataset) -> str:
    """The identity of the source a dataset was listed from: ``[data] source``'s, or for a dataset handed
    to ``extract`` as it is (predict's or the transformer's images), its own ``source``."""
    return ds.source if ds.source.startswith("<") else source_identity(cfg.data.source)


def _dataset_caches(root: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """(mtime, path, attributes) of every complete cache of a dataset in ``root``."""
    found = []
    for p in sorted(root.glob("*.h5")) if root.is_dir() else []:
        meta = cache_attrs(p)
        if meta is None or str(meta.get("source", "")).endswith(("<paths>", "<array>")):
            continue  # not a finished cache, or FeatureExtractor's own (images, not a dataset)
        found.append((p.stat().st_mtime_ns, p, meta))
    return found


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


def cache_settings(meta: dict[str, Any]) -> str:
    """A cache's backbone settings in a few words (backbone, size, layers, pooling, engine, dtype)."""
    parts = [f"{meta.get('backbone')}", f"{meta.get('image_size')} px"]
    parts.append("layer " + ",".join(meta.get("layers") or ["?"]))
    parts.append(f"pooling {meta.get('pooling')}")
    parts.append(keyed_engine(meta.get("feature_key") or {}))
    if meta.get("dtype") not in (None, "float32"):
        parts.append(str(meta["dtype"]))
    return ", ".join(p for p in parts if p)


def describe_cache(meta: dict[str, Any]) -> str:
    """A cache's source and settings in a few words: what a "which cache" line names."""
    source = meta.get("source_id") or meta.get("source") or "?"
    return f"{meta.get('dataset')} from {source}: {cache_settings(meta)}"


def _no_cache(root: Path, named: str, every: list, dataset: str | None, source: str | None) -> FeatcacheError:
    """No cache of the named data: say where it looked, and whose caches of that name are there."""
    if named:
        others = sorted(
            {str(m.get("source_id") or m.get("source")) for _, _, m in every if m.get("dataset") == dataset}
        )
        there = f" (caches named {dataset} there belong to {', '.join(others)})" if others else ""
        return FeatcacheError(
            f"no cache of {source or dataset} in {root.resolve()}{there}: run `featcache extract --data {named}` first"
        )
    return FeatcacheError(f"no cache in {root.resolve()}: run `featcache extract --data PATH` first")


def select_cache(cfg: Config) -> CacheChoice:
    """The cache a later stage works on; see the module docstring for the rule."""
    if cfg.train.cache:
        path = Path(cfg.train.cache).expanduser()
        if not path.is_file():
            raise FeatcacheError(f"--cache: no cache at {path}: run `featcache extract` first")
        return CacheChoice(path.resolve(), meta=cache_attrs(path))
    given = given_keys(cfg)
    dataset = dataset_name(cfg.data) if given & {"data.source", "data.name"} else None
    source = source_identity(cfg.data.source) if "data.source" in given else None
    root = Path(cfg.extract.cache_dir).expanduser()
    every = _dataset_caches(root)
    if source is not None:
        found = [f for f in every if belongs(f[2], source, dataset)]
    else:
        found = [f for f in every if dataset is None or f[2].get("dataset") == dataset]
    if not found:
        raise _no_cache(root, cfg.data.source if source else cfg.data.name, every, dataset, source)
    keys = [k for k in SELECTION_KEYS if k in given]
    matching = [f for f in found if all(_agrees(cfg, k, f[2]) for k in keys)]
    if not matching:
        chosen = ", ".join(
            f"{k.split('.')[1]}={getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])}" for k in keys
        )
        there = "; ".join(sorted({describe_cache(m) for _, _, m in found}))
        raise FeatcacheError(
            f"no cache of {source or dataset or 'any data'} in {root.resolve()} has {chosen} (there are: {there}):"
            " run `featcache extract` with the same settings first, or drop them to take the newest"
        )
    _, path, meta = max(matching, key=lambda f: (f[0], str(f[1])))
    which = "newest cache" + (f" of {dataset}" if dataset else " in the cache folder")
    if keys:
        which += " with the settings given"
    source = meta.get("source_id") or meta.get("source")
    note = f"cache: {path.resolve()} ({which}, from {source}: {cache_settings(meta)}; {PICK_ANOTHER})"
    if "source_id" not in meta:
        note += (
            "\nnote: this cache was written before caches recorded their source, so it was matched by its name;"
            " `featcache extract` on it records its source once"
        )
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
    """Where ``cfg``'s cache lives (building nothing when the weights digest is known without the model):
    ``<dataset>-<source tag>-<backbone>-<fingerprint>.h5``, or the cache an earlier version wrote for this
    source under the name without a tag (:func:`belongs`).

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
    fp, identity, root = fingerprint(key), dataset_identity(cfg, ds), Path(cfg.extract.cache_dir)
    path = root / (cache_stem(ds.name, spec.name, fp, source_tag(identity)) + ".h5")
    legacy = root / (cache_stem(ds.name, spec.name, fp) + ".h5")
    if not path.exists() and legacy.is_file():
        meta = cache_attrs(legacy)
        if meta is not None and belongs(meta, identity, ds.name):
            path = legacy
    return path, key, ds


def open_donors(final: Path, fp: str, wanted: set[str]) -> tuple[list[FeatureCache], set[str]]:
    """The other complete caches of the same features (fingerprint ``fp``) beside ``final`` that hold some
    of the ``wanted`` content digests, opened, newest first, and the digests they serve: those rows are
    copied by content instead of being extracted again (a moved, renamed or copied source). Only features
    are taken: labels, splits and keys always come from the source listed."""
    donors, served = [], set()
    for _, path, meta in sorted(_dataset_caches(final.parent), reverse=True):
        if path == final or meta.get("fingerprint") != fp or not wanted - served:
            continue
        try:
            donor = FeatureCache(path)
        except FeatcacheError:
            continue  # a damaged cache serves nothing
        useful = (wanted - served).intersection(donor.ids)
        if useful:
            donors.append(donor)
            served |= useful
        else:
            donor.close()
    return donors, served


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
    choice = select_cache(cfg)
    found = finished_runs(runs_root(cfg, choice.path), choice.path, finetuned)
    if found:
        return found[0].resolve()
    raise no_runs_error(cfg, choice, finetuned)


def no_runs_error(cfg: Config, choice: CacheChoice, finetuned: bool = True) -> FeatcacheError:
    """The chosen cache has no finished run: one line naming, where there is one, the newest other cache of
    the same source that has runs, and the flags that select it."""
    from pipeline.utils.runs import finished_runs

    root = runs_root(cfg, choice.path)
    then = " (and `featcache finetune`)" if finetuned else ""
    meta = choice.meta or {}
    identity = meta.get("source_id") or source_identity(str(meta.get("source") or ""))
    for _, other, m in sorted(_dataset_caches(choice.path.parent), reverse=True):
        if other.resolve() == choice.path or not belongs(m, identity, str(meta.get("dataset"))):
            continue
        runs = finished_runs(runs_root(cfg, other), other, finetuned)
        if runs:
            flags = " ".join(_selecting_flags(meta, m)) or f"--cache {other.resolve()}"
            return FeatcacheError(
                f"no finished runs of {choice.path.name} ({describe_cache(meta)}) in {root}; {len(runs)} run(s) of"
                f" {other.name} ({describe_cache(m)}): add {flags}, or run `featcache train`{then} on this one"
            )
    return FeatcacheError(f"no finished runs of {choice.path} in {root}: run `featcache train`{then} first")


def _selecting_flags(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The selection flags that tell the cache ``want`` from the cache ``have`` (both of one source)."""
    flags = []
    for key, attr in SELECTION_KEYS.items():
        value = want.get(attr)
        if value == have.get(attr) or attr in ("weights", "engine", "precision"):
            continue
        if attr == "layers":
            flags += [f"--layer {layer}" for layer in value or []]
        elif attr == "backbone":
            flags.append(f"--backbone {value}")
        else:
            flags.append(f"--{key.split('.')[1].replace('_', '-')} {value}")
    return flags
