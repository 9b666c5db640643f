"""One typed configuration, read from one TOML file by every stage and overridable from the CLI.

Each key is declared once, as a field of its section (:mod:`pipeline.utils.sections`) with
:func:`~pipeline.utils.schema.opt`: its type, default, choices or range, command-line flag and help. The checks, the flags of ``pipeline/cli.py`` and the
keywords of the Python API (:func:`resolve_config`) are made from that declaration. The dataclass defaults
*are* the defaults; ``configs/default.toml`` documents them and a test keeps the two equal. Unknown keys and
ill-typed values raise :class:`FeatcacheError` naming the offending key, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.utils import schema
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.sections import (  # noqa: F401 - re-exported: the config's public names
    COMPRESSIONS,
    DECODE_POLICIES,
    DTYPES,
    ENGINES,
    HEAD_NAMES,
    LABEL_FILTERS,
    MULTILABEL,
    ON_ERROR,
    POOLINGS,
    PRECISIONS,
    RESIZE_POLICIES,
    SPLITS,
    STRATEGIES,
    STREAMING,
    TEMPLATE_SETS,
    TEXT_HEADS,
    AuditConfig,
    BackboneConfig,
    ClusterConfig,
    CompareConfig,
    DataConfig,
    ExportConfig,
    ExtractConfig,
    FindConfig,
    FinetuneConfig,
    IndexConfig,
    PredictConfig,
    ReportConfig,
    SearchConfig,
    SecurityConfig,
    TrainConfig,
    ZeroshotConfig,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    find: FindConfig = field(default_factory=FindConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    zeroshot: ZeroshotConfig = field(default_factory=ZeroshotConfig)
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


def _check_fractions(cfg: Config) -> None:
    d = cfg.data
    if d.val_fraction + d.test_fraction >= 1.0:
        raise FeatcacheError(
            f"config: data.val_fraction + data.test_fraction must be < 1 (got {d.val_fraction} + {d.test_fraction}),"
            " or nothing is left to train on"
        )


def _check_precision(cfg: Config) -> None:
    x = cfg.extract
    if x.precision != "float32" and x.engine not in ("auto", "tensorflow"):
        raise FeatcacheError(
            f"config: extract.precision={x.precision} runs on TensorFlow, not with engine {x.engine}"
        )


#: the rules that involve more than one key (each key's own rules are declared with it)
CROSS_CHECKS = (_check_fractions, _check_precision)


def config_keys() -> dict[str, schema.Key]:
    """Every key of :class:`Config`, by dotted name, in the order of ``configs/default.toml``."""
    return schema.keys(Config)


def _validate(cfg: Config) -> None:
    schema.validate(cfg)
    for rule in CROSS_CHECKS:
        rule(cfg)


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
    given: set[str] = set()
    if path:
        p = Path(path)
        defaults = Config()
        for section, values in read_toml(p, "config file").items():
            if not isinstance(values, dict):
                raise FeatcacheError(f"{p}: top-level key {section!r} must be a [section]")
            for name, value in values.items():
                schema.assign(cfg, f"{section}.{name}", value, str(p))
                if getattr(getattr(cfg, section), name) != getattr(getattr(defaults, section), name):
                    given.add(f"{section}.{name}")
    return _overridden(cfg, given, overrides or {})


def _overridden(cfg: Config, given: set[str], overrides: dict[str, Any]) -> Config:
    for dotted, value in overrides.items():
        if value is None:
            continue
        schema.assign(cfg, dotted, value, "override")
        given.add(dotted)
    _validate(cfg)
    cfg.given = frozenset(given)
    return cfg


def follow_layers(overrides: dict[str, Any]) -> dict[str, Any]:
    """The stages after extract use the layer given (``--layer``, ``layer=``) too: it sets ``train.layer``."""
    layers = overrides.get("backbone.layers")
    if not layers or overrides.get("train.layer") is not None:
        return overrides
    items = layers.split(",") if isinstance(layers, str) else list(layers)
    return {**overrides, "train.layer": str(items[0]).strip()}


def resolve_config(config: Config | str | Path | None = None, section: str = "", /, **options: Any) -> Config:
    """The one way every stage reads its settings: ``config`` (a :class:`Config`, a TOML path or None for the
    defaults) with ``options`` on top. Keywords override the config's values, whichever form it has
    (a given :class:`Config` is copied, never changed); None means "not given". See :func:`pipeline.utils.schema.keyword_key`
    for the keyword forms; ``section`` is the calling stage's."""
    overrides = {
        schema.keyword_key(n, config_keys(), section): v for n, v in options.items() if v is not None
    }
    if section != "extract":
        overrides = follow_layers(overrides)
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    if not isinstance(config, Config):
        raise FeatcacheError(f"config must be a Config, a TOML file or None, got {type(config).__name__}")
    if not overrides:
        _validate(config)
        return config
    return _overridden(copy.deepcopy(config), set(config.given), overrides)
