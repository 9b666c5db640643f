"""Stage 3: turn a stage-2 run (a head fitted on cached features) into one end-to-end Keras model.

    image (raw RGB 0..255, any size) ─► [augmentation, training only] ─► ResizeImages(S, policy)
        ─► core: Preprocess(mode) or a preset's ScaleOffset ─► FrozenBackbone(cut, always training=False)
                 ─► the same pooling (a CNN map's, or TokenPooling of a transformer's tokens)
                 ─► head: transforms as layers (Standardize, L2Normalize, PCAProject) ─► Dense ─► probabilities

Nothing is re-implemented: resize and preprocessing are :mod:`pipeline.data.preprocess`'s (the functions
extraction uses), the cut and the pooling are :mod:`pipeline.features.backbones.build`'s. The head is converted
*exactly*: scikit-learn's linear heads (logistic regression, linear SVM, ridge, their SGD variants) and
MLPs become Dense layers with the fitted coefficients, the transforms become layers with the fitted
statistics, Keras heads are copied layer by layer with their weights. The model outputs exactly what stage
2 reports for a row: ``predict_proba`` when the head has it, else the softmax of its decision scores, spread
over the cache's classes; for a multi-label run one sigmoid probability per class (a one-vs-rest linear
head is one Dense layer of its per-class coefficient rows with a sigmoid). :func:`rebuild` checks the converted head against the fitted scikit-learn
pipeline on cached features and refuses a conversion that differs by more than :data:`HEAD_TOLERANCE`.

Why ``FrozenBackbone``: in Keras 3 a functional model passes the outer ``training`` flag down to every
nested call, overriding an explicit ``training=False`` in the graph, so ``fit`` would put BatchNorm in
batch-statistics mode and turn on the backbone's stochastic depth. The wrapper calls the backbone with
``training=False`` whatever the caller says; BatchNorm layers are also kept ``trainable=False``.

All custom layers are registered (package ``featcache``) with a ``get_config``, so the ``.keras`` files load
with ``safe_mode=True`` once ``pipeline.model.rebuild`` is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.data.augment import augmentation_layers
from pipeline.data.images import samples_for_rows
from pipeline.data.preprocess import ResizeImages
from pipeline.model.convert import build_head_model, stage2_scores
from pipeline.model.layers import FrozenBackbone
from pipeline.model.runners import predict_images
from pipeline.utils.config import Config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import RunMetrics

#: Largest accepted max |Δ probability| between the converted head and the scikit-learn pipeline.
HEAD_TOLERANCE = 1e-5


def known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in (d or {}).items() if k in names}


@dataclass
class RunSource:
    """Where a run's features came from: backbone settings, input size, resize policy, cache (if present)."""

    backbone: dict[str, Any]
    data: dict[str, Any]
    image_size: int
    resize: str
    layer: str
    cache_path: Path | None
    cache_meta: dict[str, Any] = field(default_factory=dict)
    decode: str = "exact"  # the data.decode policy of the features (caches from before it: exact)


def cache_source(path: Path, meta: dict[str, Any], layer: str) -> RunSource:
    """How the cache at ``path`` (``meta``: its attributes) made the features of ``layer``: its backbone
    settings, input size, resize and decode policy, exactly as it recorded them."""
    from pipeline.cache.fingerprint import decode_policy

    cfg = meta.get("config", {})
    return RunSource(
        dict(cfg.get("backbone", {})),
        dict(cfg.get("data", {})),
        int(meta["image_size"]),
        str(meta.get("resize", "stretch")),
        layer,
        path,
        meta,
        decode_policy(meta.get("feature_key") or {}),
    )


def run_source(metrics: RunMetrics) -> RunSource:
    """The backbone settings of a run: from its cache when present (exact), else from the run's config,
    accepted only if it reproduces the cache fingerprint the run recorded."""
    from pipeline.cache.store import FeatureCache
    from pipeline.utils.config import BackboneConfig, DataConfig, ExtractConfig

    path = metrics.cache_path
    if path is not None and path.is_file():
        with FeatureCache(path) as c:
            meta = dict(c.meta)
        if meta.get("fingerprint") == metrics.cache_fingerprint:
            return cache_source(path, meta, metrics["layer"])
    from pipeline.cache.fingerprint import feature_key, fingerprint, weights_digest
    from pipeline.features.backbones.registry import get_spec

    conf = metrics.config
    decode = str((conf.get("data") or {}).get("decode", "exact"))  # runs from before data.decode: exact
    cfg = Config(
        data=DataConfig(decode=decode),
        backbone=BackboneConfig(**known_fields(BackboneConfig, conf.get("backbone", {}))),
        extract=ExtractConfig(**known_fields(ExtractConfig, conf.get("extract", {}))),
    )
    spec = get_spec(cfg.backbone.name)
    digest = weights_digest(spec, cfg.backbone.weights, cfg.backbone.layers, cfg.extract.cache_dir)
    known = (
        {fingerprint(feature_key(cfg, spec, digest, decodes=d)) for d in (True, False)} if digest else set()
    )
    if metrics.cache_fingerprint not in known:
        raise FeatcacheError(
            f"the run's cache {path} is gone and its config does not describe the backbone that made its "
            "features; re-extract the cache and train again"
        )
    b = cfg.backbone
    return RunSource(
        dataclasses.asdict(b),
        conf.get("data", {}),
        b.image_size or spec.default_size,
        b.resize,
        metrics["layer"],
        None,
        decode=decode,
    )


@dataclass
class Rebuilt:
    """The end-to-end model of a run, and the pieces fine-tuning and export need."""

    model: keras.Model  # image (N×H×W×3 raw, any size) → probabilities (N × n_classes); inference
    train_model: keras.Model  # augmentation → ``model``; what fine-tuning fits
    core: keras.Model  # N×S×S×3 raw pixels → probabilities: what TFLite runs (resize happens before it)
    head: keras.Model  # cached features → probabilities
    backbone: keras.Model  # the cut backbone inside FrozenBackbone (fine-tuning unfreezes its layers)
    class_names: list[str]
    image_size: int
    resize: str
    source: RunSource
    run_dir: Path
    metrics: RunMetrics
    pipeline: Any  # the stage-2 scikit-learn Pipeline
    calibrated: bool
    head_check: float | None = None  # max |Δ| converted head vs scikit-learn on cached rows

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        """A multi-label run: the model's outputs are one sigmoid probability per class."""
        return self.metrics.multilabel

    @property
    def decode(self) -> str:
        """The ``data.decode`` policy of the run's features: what every image this model sees is read with."""
        return self.source.decode


def _backbone_cut(source: RunSource):
    from pipeline.features.backbones.build import backbone_cut, build_feature_model
    from pipeline.utils.config import BackboneConfig

    cfg = BackboneConfig(**known_fields(BackboneConfig, {**source.backbone, "layers": [source.layer]}))
    cfg.image_size = source.image_size
    fm = build_feature_model(cfg)
    return fm, backbone_cut(fm, source.layer)


def assemble(
    fm, cut, head: keras.Model, image_size: int, resize: str, pooling: str, layer: str, augment=()
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """(model, train_model, core) around an existing cut backbone and head model."""
    from pipeline.features.backbones.build import pooling_layer, preprocess_layer

    for lyr in cut.layers:
        if isinstance(lyr, keras.layers.BatchNormalization):
            lyr.trainable = False
    inp = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = preprocess_layer(fm.spec)(inp)
    x = FrozenBackbone(cut, name="backbone")(x)
    x = pooling_layer(x, pooling, layer, fm.prefix_tokens)
    core = keras.Model(inp, head(x), name="core")

    raw = keras.Input((None, None, 3), dtype="float32", name="image")
    model = keras.Model(
        raw, core(ResizeImages(image_size, resize, name="resize")(raw)), name="featcache_model"
    )

    t_in = keras.Input((None, None, 3), dtype="float32", name="image")
    x = t_in
    for layer_ in augmentation_layers(list(augment)):
        x = layer_(x)
    train_model = keras.Model(t_in, model(x), name="featcache_train")
    return model, train_model, core


def rebuild(run_dir: str | Path, *, augment=(), check_rows: int = 256, trust_pickle: bool = False) -> Rebuilt:
    """The end-to-end Keras model of a stage-2 run, its head verified against scikit-learn."""
    from pipeline.heads.persist import load_run

    run_dir = Path(run_dir)
    loaded = load_run(run_dir, trust_pickle=trust_pickle)
    metrics, pipeline = loaded.metrics, loaded.model
    source = run_source(metrics)
    class_names, n_features, calibrated = metrics.class_names, metrics.n_features, metrics.calibrated
    multilabel = metrics.multilabel
    head = build_head_model(pipeline, n_features, len(class_names), calibrated, multilabel)
    head_check = _check_head(head, pipeline, source, len(class_names), check_rows, multilabel)
    fm, cut = _backbone_cut(source)
    pooling = source.backbone.get("pooling", "avg")
    model, train_model, core = assemble(
        fm, cut, head, source.image_size, source.resize, pooling, source.layer, augment
    )
    return Rebuilt(
        model, train_model, core, head, cut, class_names, source.image_size, source.resize, source,
        run_dir, metrics, pipeline, calibrated, head_check,
    )  # fmt: skip


def _check_head(
    head, pipeline, source: RunSource, n_classes: int, n_rows: int, multilabel: bool = False
) -> float | None:
    """Converted head vs the scikit-learn pipeline on cached features (val rows first): raise if they differ."""
    if source.cache_path is None:
        return None
    from pipeline.cache.store import FeatureCache

    with FeatureCache(source.cache_path) as c:
        rows = np.concatenate([c.rows("val"), c.rows("test"), c.rows("train")])[:n_rows]
        X = c.features(source.layer, np.sort(rows))
    want, _ = stage2_scores(pipeline, X, n_classes, multilabel)
    got = np.asarray(head(X.astype(np.float32), training=False), np.float64)
    diff = float(np.max(np.abs(got - want))) if len(X) else 0.0
    if not diff <= HEAD_TOLERANCE:
        raise FeatcacheError(
            f"internal: the converted head differs from the scikit-learn head by {diff:.2e} (> {HEAD_TOLERANCE}); "
            "please report this"
        )
    return diff


def _same(got: np.ndarray, want: np.ndarray, rebuilt: Rebuilt) -> int:
    """Rows predicted alike: the same top class, or for a multi-label run the same label set."""
    if not rebuilt.multilabel:
        return int((got.argmax(1) == want.argmax(1)).sum())
    from pipeline.heads.multilabel import above

    t = rebuilt.metrics.thresholds
    return int(np.all(above(got, t) == above(want, t), axis=1).sum())


def cache_dataset(meta: dict[str, Any]):
    """The dataset a cache was extracted from (``load_dataset`` on the cache's own data config)."""
    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    data = known_fields(DataConfig, (meta.get("config") or {}).get("data", {}))
    src = str(data.get("source", ""))
    if (
        src.strip() not in ("fashion_mnist", "fashion-mnist")
        and meta.get("source")
        and Path(meta["source"]).exists()
    ):
        data["source"] = meta["source"]  # absolute: the cache may be used from another working directory
    data["on_error"] = "skip"
    options = data.get("storage_options") or {}
    # secrets were not stored (redacted): they come from the environment
    data["storage_options"] = {k: v for k, v in options.items() if v != "***"}
    cache_dir = Path(((meta.get("config") or {}).get("extract") or {}).get("cache_dir") or "")
    index = cache_dir / "shards" if str(cache_dir) != "." and cache_dir.is_dir() else None
    return load_dataset(DataConfig(**data), index)  # unchanged shards are not listed again


def equivalence(rebuilt: Rebuilt, split: str = "val", batch_size: int = 32, limit: int = 0) -> dict[str, Any]:
    """Max |Δ probability| between the rebuilt model on the split's images and stage 2 on its cached rows."""
    from pipeline.cache.store import FeatureCache

    if rebuilt.source.cache_path is None:
        raise FeatcacheError("equivalence needs the run's cache, which is gone")
    with FeatureCache(rebuilt.source.cache_path) as c:
        ds = cache_dataset(c.meta)
        rows, samples, missing = samples_for_rows(c, ds, c.rows(split))
        if limit:
            rows, samples = rows[:limit], samples[:limit]
        X = c.features(rebuilt.source.layer, rows)
    want, _ = stage2_scores(rebuilt.pipeline, X, rebuilt.n_classes, rebuilt.multilabel)
    got, ok = predict_images(
        rebuilt.model, ds, samples, rebuilt.image_size, rebuilt.resize, batch_size, decode=rebuilt.decode
    )
    if len(rows) == 0 or not ok.any():
        return {"split": split, "n": 0, "max_abs_diff": None}
    diff = np.abs(got[ok] - want[ok])
    return {
        "split": split,
        "n": int(ok.sum()),
        "max_abs_diff": float(diff.max()),
        "same_predictions": _same(got[ok], want[ok], rebuilt),
        "missing": len(missing),
    }
