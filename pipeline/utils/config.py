"""One typed configuration, read from one TOML file by every stage and overridable from the CLI.

The dataclass defaults *are* the defaults; ``configs/default.toml`` documents them and a test keeps the
two equal. Unknown keys and ill-typed values raise :class:`FeatcacheError` naming the offending key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.utils.errors import FeatcacheError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


SPLITS = ("train", "val", "test")


POOLINGS = ("avg", "max", "flatten", "none")


RESIZE_POLICIES = ("stretch", "crop", "pad")


ON_ERROR = ("skip", "fail")


DECODE_POLICIES = ("dct", "exact")


DTYPES = ("float32", "float16")


COMPRESSIONS = ("none", "gzip", "lzf")


ENGINES = ("auto", "tensorflow", "tflite")


#: the heads of :data:`pipeline.heads.registry.HEADS`, named here so a bad name fails before any import
HEAD_NAMES = ("logistic", "linear_svm", "ridge", "knn", "mlp", "hgb", "keras_linear", "keras_mlp")


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    source: str = (
        "fashion_mnist"  # built-in demo, a folder, a .csv, a .npz, .tar shards or .parquet; or a URL
    )
    name: str = ""  # dataset name used in the cache file name; derived from the source when empty
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    group_pattern: str = ""  # regex on the relative path; its first group keeps related images in one split
    limit: int = 0  # 0 = all; else a stable, content-hashed subset of this many samples
    on_error: str = "skip"  # what an unreadable image does: skip (quarantine it) or fail the run
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for URL sources
    decode: str = (
        "dct"  # dct: JPEGs decoded at the smallest 1/2-1/4-1/8 DCT scale >= 2x the input; exact: full size
    )


@dataclass
class BackboneConfig:
    """Everything that changes a feature: all of it goes into the cache fingerprint."""

    name: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    layers: list[str] = field(default_factory=list)  # empty = the backbone's last feature map
    pooling: str = "avg"
    image_size: int = 0  # 0 = the backbone's default input size
    resize: str = "stretch"  # stretch | crop (center) | pad (letterbox)


@dataclass
class ExtractConfig:
    cache_dir: str = "cache"
    batch_size: int = 32
    dtype: str = "float32"
    compression: str = "none"
    engine: str = "auto"  # auto | tensorflow | tflite: auto converts to TFLite once when that is faster
    threads: int = 0  # 0 = all cores
    lock_timeout: float = -1  # seconds to wait for another run on the same cache; -1 = wait forever
    progress: bool = True
    augment_views: int = 0  # K > 0: also cache K augmented views (finetune.augment) of every train image


@dataclass
class TrainConfig:
    cache: str = ""  # cache file; empty = the cache that [data] + [backbone] describe
    layer: str = ""  # which cached layer to train on; empty = the first
    head: str = "logistic"
    params: dict[str, Any] = field(default_factory=dict)
    transforms: list[str] = field(default_factory=lambda: ["standardize"])
    runs_dir: str = ""  # empty = <cache_dir>/runs
    seed: int = 0
    streaming: str = "auto"  # auto | memory | stream


@dataclass
class SearchConfig:
    space: str = ""  # TOML file declaring the search space; empty = the built-in space
    strategy: str = "random"
    n_trials: int = 100
    n_jobs: int = 1
    cv: int = 0  # 0 = the fixed validation split; k >= 2 = k-fold CV on train+val
    convertible: bool = False  # only heads that finetune/export can convert (no knn, hgb)
    refit: bool = True  # train the best configuration as a run (on train, scored on val and test)


@dataclass
class FinetuneConfig:
    run: str = ""  # the stage-2 run folder whose head is rebuilt; empty = the latest
    unfreeze: str = "top:20"  # none | all | top:N (layers)
    learning_rate: float = 1e-5
    epochs: int = 5
    batch_size: int = 32
    patience: int = 2
    augment: list[str] = field(
        default_factory=lambda: ["flip", "rotation", "zoom", "translation", "contrast"]
    )
    tensorboard: bool = False  # write TensorBoard logs (Keras' callback) to <run>/tensorboard
    keep_worse: bool = False  # true = keep the best epoch even when it does not beat the model before


@dataclass
class ClusterConfig:
    """Where extraction and search run: this process, a local Dask cluster, or an existing scheduler."""

    address: str = ""  # "" = this process | local | local:N | env | tcp://host:8786


@dataclass
class SecurityConfig:
    """What featcache may load from files someone else wrote."""

    trust_pickle: bool = False  # true: load the pickles of featcache 0.1 runs (they can run any code)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: dotted keys the user chose (see :func:`given_keys`); not a field, so never saved or compared
    given: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        """The settings as caches and run folders record them: credentials never leave memory."""
        out = dataclasses.asdict(self)
        out["data"]["storage_options"] = redact_options(out["data"]["storage_options"])
        return out


_SECRET = re.compile(r"key|secret|token|password|credential|sas|connection_string", re.I)


def redact_options(options: dict) -> dict:
    """``storage_options`` fit to store: secrets replaced by ``***`` (they come from the environment or
    the config file again when needed)."""
    return {k: ("***" if _SECRET.search(str(k)) else v) for k, v in (options or {}).items()}


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_error": ON_ERROR,
    "data.decode": DECODE_POLICIES,
    "backbone.pooling": POOLINGS,
    "backbone.resize": RESIZE_POLICIES,
    "extract.dtype": DTYPES,
    "extract.compression": COMPRESSIONS,
    "extract.engine": ENGINES,
    "train.streaming": ("auto", "memory", "stream"),
    "search.strategy": ("grid", "random", "halving"),
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field's annotation; strings from the CLI are parsed here."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif annotation is Any:
        return value
    kind = getattr(annotation, "__name__", str(annotation))
    raise FeatcacheError(f"config: {key} must be {kind}, got {value!r}")


def _validate(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if any(
                "\x00" in v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)
            ):
                raise FeatcacheError(f"config: {section.name}.{f.name} must not contain a NUL character")
    for key in ("data.source", "extract.cache_dir"):  # "" would silently mean the current folder
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name).strip():
            raise FeatcacheError(f"config: {key} must not be empty")
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise FeatcacheError(f"config: {key} must be one of {', '.join(choices)}, got {value!r}")
    if cfg.train.head not in HEAD_NAMES:
        raise FeatcacheError(f"unknown head {cfg.train.head!r} (known: {', '.join(HEAD_NAMES)})")
    d = cfg.data
    for key in ("val_fraction", "test_fraction"):
        v = getattr(d, key)
        if not 0.0 <= v < 1.0:
            raise FeatcacheError(f"config: data.{key} must be in [0, 1), got {v}")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise FeatcacheError(
            f"config: data.val_fraction + data.test_fraction must be < 1 (got {d.val_fraction} + {d.test_fraction}),"
            " or nothing is left to train on"
        )
    if d.limit < 0:
        raise FeatcacheError(f"config: data.limit must be >= 0, got {d.limit}")
    if d.group_pattern:
        import re

        try:
            re.compile(d.group_pattern)
        except re.error as e:
            raise FeatcacheError(f"config: data.group_pattern is not a valid regex: {e}") from None
    positive = {
        "extract.batch_size": cfg.extract.batch_size,
        "finetune.batch_size": cfg.finetune.batch_size,
        "search.n_trials": cfg.search.n_trials,
    }
    for key, v in positive.items():
        if v < 1:
            raise FeatcacheError(f"config: {key} must be >= 1, got {v}")
    if cfg.backbone.image_size != 0 and not 16 <= cfg.backbone.image_size <= 2048:
        raise FeatcacheError(
            f"config: backbone.image_size must be 0 (default) or in [16, 2048], got {cfg.backbone.image_size}"
        )
    if cfg.extract.threads < 0:
        raise FeatcacheError(f"config: extract.threads must be >= 0, got {cfg.extract.threads}")
    if not cfg.backbone.name.strip():
        raise FeatcacheError("config: backbone.name must not be empty")
    if cfg.search.n_jobs == 0:
        raise FeatcacheError("config: search.n_jobs must not be 0 (use -1 for all cores)")
    if cfg.search.cv == 1 or cfg.search.cv < 0:
        raise FeatcacheError(
            f"config: search.cv must be 0 (validation split) or >= 2 folds, got {cfg.search.cv}"
        )
    if cfg.cluster.address:
        from pipeline.utils.cluster import parse_address

        parse_address(cfg.cluster.address)  # a malformed address fails now, before any work
    if not cfg.finetune.learning_rate > 0:
        raise FeatcacheError(f"config: finetune.learning_rate must be > 0, got {cfg.finetune.learning_rate}")


def _field_types(section_obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def _set(cfg: Config, dotted: str, value: Any, origin: str) -> None:
    section, _, name = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections or not name:
        raise FeatcacheError(
            f"{origin}: unknown config key {dotted!r} (sections: {', '.join(sorted(sections))})"
        )
    sec = getattr(cfg, section)
    types_ = _field_types(sec)
    if name not in types_:
        raise FeatcacheError(
            f"{origin}: unknown config key {dotted!r} (known in [{section}]: {', '.join(types_)})"
        )
    annotation = types_[name]
    if isinstance(annotation, types.UnionType):  # pragma: no cover - no unions today
        annotation = Any
    setattr(sec, name, _coerce(dotted, value, annotation))


def given_keys(cfg: Config) -> frozenset[str]:
    """The dotted keys the user chose: every override (flag, ``--set``, API override), and every key of
    the config file whose value differs from the default (a copy of ``configs/default.toml`` chooses
    nothing). Later stages follow the newest cache except where these keys pin it down."""
    return cfg.given


def read_toml(p: Path, what: str) -> dict[str, Any]:
    """A TOML file's table, or one line naming the file: missing, or not valid TOML."""
    if not p.is_file():
        raise FeatcacheError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FeatcacheError(f"{p}: not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults ← TOML file ← overrides (``{"backbone.name": "vgg16", ...}``), validated once at the end."""
    cfg = Config()
    defaults = Config()
    given: set[str] = set()
    if path:
        p = Path(path)
        raw = read_toml(p, "config file")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise FeatcacheError(f"{p}: top-level key {section!r} must be a [section]")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value, str(p))
                if getattr(getattr(cfg, section), name) != getattr(getattr(defaults, section), name):
                    given.add(f"{section}.{name}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        _set(cfg, dotted, value, "override")
        given.add(dotted)
    _validate(cfg)
    cfg.given = frozenset(given)
    return cfg


def parse_assignments(items: list[str], origin: str = "--set") -> dict[str, str]:
    """``["a.b=1", ...]`` → ``{"a.b": "1"}``; values are typed later against the dataclass fields."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FeatcacheError(f"{origin}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out
