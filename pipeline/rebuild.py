"""Stage 3: turn a stage-2 run (a head fitted on cached features) into one end-to-end Keras model.

    image (raw RGB 0..255, any size) ─► [augmentation, training only] ─► ResizeImages(S, policy)
        ─► core: Preprocess(mode) ─► FrozenBackbone(cut, always training=False) ─► the same pooling
                 ─► head: transforms as layers (Standardize, L2Normalize, PCAProject) ─► Dense ─► probabilities

Nothing is re-implemented: resize and preprocessing are :mod:`pipeline.preprocess`'s (the functions
extraction uses), the cut and the pooling are :mod:`pipeline.backbones.build`'s. The head is converted
*exactly*: scikit-learn's linear heads (logistic regression, linear SVM, ridge, their SGD variants) and
MLPs become Dense layers with the fitted coefficients, the transforms become layers with the fitted
statistics, Keras heads are copied layer by layer with their weights. The model outputs exactly what stage
2 reports for a row: ``predict_proba`` when the head has it, else the softmax of its decision scores, spread
over the cache's classes. :func:`rebuild` checks the converted head against the fitted scikit-learn
pipeline on cached features and refuses a conversion that differs by more than :data:`HEAD_TOLERANCE`.

Why ``FrozenBackbone``: in Keras 3 a functional model passes the outer ``training`` flag down to every
nested call, overriding an explicit ``training=False`` in the graph, so ``fit`` would put BatchNorm in
batch-statistics mode and turn on the backbone's stochastic depth. The wrapper calls the backbone with
``training=False`` whatever the caller says; BatchNorm layers are also kept ``trainable=False``.

All custom layers are registered (package ``featcache``) with a ``get_config``, so the ``.keras`` files load
with ``safe_mode=True`` once ``pipeline.rebuild`` is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .errors import FeatcacheError
from .extract import VIEW_SUFFIX  # keys of augmented-view rows (extract.augment_views)
from .preprocess import Preprocess, ResizeImages

#: Largest accepted max |Δ probability| between the converted head and the scikit-learn pipeline.
HEAD_TOLERANCE = 1e-5
#: The end-to-end equivalence the tests hold the rebuilt model to (images vs cached features).
EQUIVALENCE_TOLERANCE = 1e-4
#: Augmentations known to ``finetune.augment``; factors are fixed (documented in the README).
AUGMENTATIONS = ("flip", "rotation", "zoom", "translation", "contrast")


# --------------------------------------------------------------------------------------------- layers


@keras.saving.register_keras_serializable(package="featcache")
class FrozenBackbone(keras.layers.Layer):
    """Calls the wrapped backbone with ``training=False`` always: BatchNorm in inference mode, no dropout.

    Its layers may still be trainable (fine-tuning updates their weights); only the *mode* is fixed.
    """

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        self.backbone = backbone

    def call(self, x):
        return self.backbone(x, training=False)

    def compute_output_shape(self, input_shape):
        return self.backbone.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(self.backbone)}


class _Quantizable:
    """Layers with a second, quantization-friendly formulation of the same function (see :func:`quantizable`)."""

    quantizable = False  # instance flag, set only while a quantized TFLite model is being converted


@contextlib.contextmanager
def quantizable(model):
    """While converting a quantized TFLite model, Standardize and PCAProject compute the same function in a form
    int8 handles: a per-feature scaling followed by a Dense layer would be folded into the Dense kernel by the
    converter, where int8 weight quantization loses every small weight (measured on Fashion-MNIST: accuracy 0.64
    instead of 0.86), and an elementwise multiply by a constant vector gets one int8 scale for the whole vector.
    As a 1×1 depthwise convolution (Standardize) or one matrix product (PCAProject), every feature keeps its own
    weight scale. Float models (Keras, SavedModel, float TFLite) keep the exact scikit-learn formula."""
    found = []

    def walk(layer):
        if isinstance(layer, _Quantizable):
            found.append(layer)
        for sub in getattr(layer, "layers", []) or []:
            walk(sub)

    walk(model)
    for layer in found:
        layer.quantizable = True
    try:
        yield len(found)
    finally:
        for layer in found:
            layer.quantizable = False


@keras.saving.register_keras_serializable(package="featcache")
class Standardize(_Quantizable, keras.layers.Layer):
    """scikit-learn's ``StandardScaler.transform``: ``(x - mean) / scale`` (fixed, never trained)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.mean = self.add_weight(shape=(self.units,), initializer="zeros", trainable=False, name="mean")
        self.scale = self.add_weight(shape=(self.units,), initializer="ones", trainable=False, name="scale")

    def call(self, x):
        if not self.quantizable:
            return (x - self.mean) / self.scale
        inv = 1.0 / self.scale
        y = tf.nn.depthwise_conv2d(
            tf.reshape(x, [-1, 1, 1, self.units]),
            tf.reshape(inv, [1, 1, self.units, 1]),
            [1, 1, 1, 1],
            "VALID",
        )
        return tf.reshape(y, [-1, self.units]) - self.mean * inv

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="featcache")
class L2Normalize(keras.layers.Layer):
    """scikit-learn's ``Normalizer(norm="l2")``: each row divided by its L2 norm (zero rows stay zero)."""

    def call(self, x):
        norm = tf.sqrt(tf.reduce_sum(x * x, axis=-1, keepdims=True))
        return x / tf.where(norm == 0.0, tf.ones_like(norm), norm)


@keras.saving.register_keras_serializable(package="featcache")
class PCAProject(_Quantizable, keras.layers.Layer):
    """scikit-learn's (Incremental)PCA ``transform``: ``(x @ Cᵀ - mean @ Cᵀ) / whiten_scale`` (fixed)."""

    def __init__(self, units_in: int, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units_in, self.units = int(units_in), int(units)
        self.components = self.add_weight(
            shape=(self.units_in, self.units), initializer="zeros", trainable=False, name="components"
        )
        self.offset = self.add_weight(
            shape=(self.units,), initializer="zeros", trainable=False, name="offset"
        )
        self.whiten_scale = self.add_weight(
            shape=(self.units,), initializer="ones", trainable=False, name="whiten_scale"
        )

    def call(self, x):
        if not self.quantizable:
            return (tf.matmul(x, self.components) - self.offset) / self.whiten_scale
        return tf.matmul(x, self.components / self.whiten_scale) - self.offset / self.whiten_scale

    def get_config(self):
        return {**super().get_config(), "units_in": self.units_in, "units": self.units}


@keras.saving.register_keras_serializable(package="featcache")
class ScoresToProba(keras.layers.Layer):
    """Head scores → the probabilities stage 2 reports.

    ``softmax`` (multinomial logistic; softmax of decision scores for SVM/ridge, whose binary 1-column
    scores are laid out as ``[-s/2, s/2]`` so the softmax is ``[1-σ(s), σ(s)]``), ``ovr`` (one-vs-rest
    logistic: sigmoids normalized to sum 1), ``normalize`` (already probabilities, renormalized as
    ``KerasHead.predict_proba`` does), ``binary_logit`` (a Keras head's single logit z → ``[1-σ(z), σ(z)]``).
    """

    MODES = ("softmax", "ovr", "normalize", "binary_logit")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode

    def call(self, x):
        if self.mode == "softmax":
            return tf.nn.softmax(x, axis=-1)
        if self.mode == "ovr":
            p = tf.sigmoid(x)
            return p / tf.reduce_sum(p, axis=-1, keepdims=True)
        if self.mode == "normalize":
            return x / tf.reduce_sum(x, axis=-1, keepdims=True)
        return tf.nn.softmax(tf.concat([-x / 2.0, x / 2.0], axis=-1), axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2) if self.mode == "binary_logit" else tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="featcache")
class ExpandClasses(keras.layers.Layer):
    """Place a head's k output columns at their class indices among n (classes it never saw get 0)."""

    def __init__(self, columns: list[int], n_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.columns, self.n_classes = [int(c) for c in columns], int(n_classes)
        placement = np.zeros((len(self.columns), self.n_classes), np.float32)
        placement[np.arange(len(self.columns)), self.columns] = 1.0
        self._placement = tf.constant(placement)

    def call(self, x):
        return tf.matmul(x, self._placement)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "columns": self.columns, "n_classes": self.n_classes}


def augmentation_layers(names: list[str] | tuple[str, ...], seed: int = 0) -> list[keras.layers.Layer]:
    """Keras' random image layers for ``finetune.augment`` (active only when ``training=True``)."""
    L = keras.layers
    make = {
        "flip": lambda s: L.RandomFlip("horizontal", seed=s, name="aug_flip"),
        "rotation": lambda s: L.RandomRotation(0.05, fill_mode="reflect", seed=s, name="aug_rotation"),
        "zoom": lambda s: L.RandomZoom(0.1, fill_mode="reflect", seed=s, name="aug_zoom"),
        "translation": lambda s: L.RandomTranslation(
            0.1, 0.1, fill_mode="reflect", seed=s, name="aug_translation"
        ),
        "contrast": lambda s: L.RandomContrast(0.2, value_range=(0, 255), seed=s, name="aug_contrast"),
    }
    out = []
    for i, raw in enumerate(names):
        n = str(raw).strip().lower()
        if n in ("", "none"):
            continue
        if n not in make:
            raise FeatcacheError(
                f"finetune.augment: unknown augmentation {raw!r} (known: {', '.join(AUGMENTATIONS)})"
            )
        out.append(make[n](seed + i))
    return out


# --------------------------------------------------------------------------------------------- head


class NotConvertible(FeatcacheError):
    """A stage-2 head with no exact Keras equivalent."""


def _not_convertible(what: str) -> NotConvertible:
    return NotConvertible(
        f"{what} cannot be converted into Keras layers, so this run cannot be fine-tuned or exported end to end; "
        "train a linear head (--head logistic | linear_svm | ridge), an MLP (--head mlp) or a Keras head "
        "(--head keras_linear | keras_mlp) instead (predict works with any head)"
    )


def _dense(name: str, W: np.ndarray, b: np.ndarray, activation=None):
    layer = keras.layers.Dense(W.shape[1], activation=activation, name=name)
    layer.build((None, W.shape[0]))
    layer.set_weights([W.astype(np.float32), b.astype(np.float32)])
    return layer


def _linear_scores(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) whose softmax reproduces the estimator: binary 1-row coef → columns [-s/2, s/2]."""
    coef, intercept = np.atleast_2d(np.asarray(coef, np.float64)), np.ravel(np.asarray(intercept, np.float64))
    if coef.shape[0] == 1:
        return np.concatenate([-coef.T / 2, coef.T / 2], axis=1), np.concatenate(
            [-intercept / 2, intercept / 2]
        )
    return coef.T, intercept


def _transform_layers(steps) -> list[keras.layers.Layer]:
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    layers = []
    for i, (name, est) in enumerate(steps):
        lname = f"t{i}_{name.strip('_')}"
        if isinstance(est, StandardScaler):
            d = int(est.n_features_in_)
            layer = Standardize(d, name=lname)
            mean = est.mean_ if est.mean_ is not None else np.zeros(d)
            scale = est.scale_ if est.scale_ is not None else np.ones(d)
            layer.set_weights([np.asarray(mean, np.float32), np.asarray(scale, np.float32)])
        elif isinstance(est, Normalizer) and est.norm == "l2":
            layer = L2Normalize(name=lname)
        elif isinstance(est, (PCA, IncrementalPCA)):
            C = np.asarray(est.components_, np.float64)  # k × d
            k, d = C.shape
            scale = np.ones(k)
            if est.whiten:
                scale = np.sqrt(np.asarray(est.explained_variance_, np.float64))
                scale[scale < np.finfo(scale.dtype).eps] = np.finfo(scale.dtype).eps
            layer = PCAProject(d, k, name=lname)
            offset = np.asarray(est.mean_, np.float64) @ C.T
            layer.set_weights([C.T.astype(np.float32), offset.astype(np.float32), scale.astype(np.float32)])
        else:
            raise _not_convertible(f"feature transform {name!r} ({type(est).__name__})")
        layers.append(layer)
    return layers


def _sklearn_head_layers(est, calibrated: bool) -> list[keras.layers.Layer]:
    from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    if isinstance(est, (LogisticRegression, LinearSVC, RidgeClassifier, SGDClassifier)):
        W, b = _linear_scores(est.coef_, est.intercept_)
        ovr = calibrated and W.shape[1] > 2 and isinstance(est, SGDClassifier)  # one-vs-rest log loss
        return [_dense("head_dense", W, b), ScoresToProba("ovr" if ovr else "softmax", name="probabilities")]
    if isinstance(est, MLPClassifier):
        acts = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": None}
        if est.activation not in acts:
            raise _not_convertible(f"MLP activation {est.activation!r}")
        layers = []
        n = len(est.coefs_)
        for i, (W, b) in enumerate(zip(est.coefs_, est.intercepts_, strict=True)):
            if i < n - 1:
                layers.append(_dense(f"head_hidden_{i}", np.asarray(W), np.asarray(b), acts[est.activation]))
            else:
                W2, b2 = _linear_scores(np.asarray(W).T, np.asarray(b))
                layers.append(_dense("head_dense", W2, b2))
        layers.append(ScoresToProba("softmax", name="probabilities"))
        return layers
    raise _not_convertible(f"head {type(est).__name__}")


def _keras_head_layers(head) -> list[keras.layers.Layer]:
    """Copy a KerasHead's layers (config + weights); its output becomes stage 2's probabilities."""
    layers = []
    for layer in head.model_.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        cfg = layer.get_config()
        cfg["name"] = "head_" + cfg["name"]
        clone = layer.__class__.from_config(cfg)
        layers.append((clone, layer))
    out = []
    x = keras.Input(head.model_.inputs[0].shape[1:])
    for clone, orig in layers:
        x = clone(x)
        clone.set_weights(orig.get_weights())
        out.append(clone)
    binary = len(head.classes_) == 2
    out.append(ScoresToProba("binary_logit" if binary else "normalize", name="probabilities"))
    return out


def build_head_model(pipeline, n_features: int, n_classes: int, calibrated: bool) -> keras.Model:
    """features (N×D, as cached) → probabilities over the cache's classes, from a fitted sklearn Pipeline."""
    from .heads import KerasHead

    est = pipeline.steps[-1][1]
    transforms = _transform_layers(pipeline.steps[:-1])
    head = _keras_head_layers(est) if isinstance(est, KerasHead) else _sklearn_head_layers(est, calibrated)
    columns = np.asarray(est.classes_).astype(int).tolist()
    inp = keras.Input((n_features,), name="features")
    x = inp
    for layer in transforms + head:
        x = layer(x)
    if columns != list(range(n_classes)):
        x = ExpandClasses(columns, n_classes, name="expand_classes")(x)
    return keras.Model(inp, x, name="head")


def stage2_scores(pipeline, X: np.ndarray, n_classes: int) -> tuple[np.ndarray, bool]:
    """Exactly what stage 2 reports for feature rows ``X``: (N × n_classes probabilities, calibrated)."""
    from .train import _scores

    p, calibrated = _scores(pipeline, X)
    full = np.zeros((len(X), n_classes), np.float64)
    full[:, np.asarray(pipeline.steps[-1][1].classes_).astype(int)] = p
    return full, calibrated


# --------------------------------------------------------------------------------------------- backbone


def _known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
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


def run_source(metrics: dict[str, Any]) -> RunSource:
    """The backbone settings of a run: from its cache when present (exact), else from the run's config,
    accepted only if it reproduces the cache fingerprint the run recorded."""
    from .config import BackboneConfig, Config, ExtractConfig
    from .store import FeatureCache

    info = metrics.get("cache", {})
    path = Path(info.get("path", ""))
    if info.get("path") and path.is_file():
        with FeatureCache(path) as c:
            meta = dict(c.meta)
        if meta.get("fingerprint") == info.get("fingerprint"):
            cfg = meta.get("config", {})
            return RunSource(
                dict(cfg.get("backbone", {})),
                dict(cfg.get("data", {})),
                int(meta["image_size"]),
                str(meta.get("resize", "stretch")),
                metrics["layer"],
                path,
                meta,
            )
    from .backbones.registry import get_spec
    from .fingerprint import feature_key, fingerprint, weights_digest

    conf = metrics.get("config", {})
    cfg = Config(
        backbone=BackboneConfig(**_known_fields(BackboneConfig, conf.get("backbone", {}))),
        extract=ExtractConfig(**_known_fields(ExtractConfig, conf.get("extract", {}))),
    )
    spec = get_spec(cfg.backbone.name)
    digest = weights_digest(spec, cfg.backbone.weights, cfg.backbone.layers, cfg.extract.cache_dir)
    if digest is None or fingerprint(feature_key(cfg, spec, digest)) != info.get("fingerprint"):
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
    )


# --------------------------------------------------------------------------------------------- model


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
    metrics: dict[str, Any]
    pipeline: Any  # the stage-2 scikit-learn Pipeline
    calibrated: bool
    head_check: float | None = None  # max |Δ| converted head vs scikit-learn on cached rows

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _backbone_cut(source: RunSource):
    from .backbones.build import build_feature_model
    from .config import BackboneConfig

    cfg = BackboneConfig(**_known_fields(BackboneConfig, {**source.backbone, "layers": [source.layer]}))
    cfg.image_size = source.image_size
    fm = build_feature_model(cfg)
    base = fm.base
    cut = keras.Model(base.inputs, base.get_layer(source.layer).output, name=f"{fm.spec.name}_cut")
    return fm, cut


def assemble(
    fm, cut, head: keras.Model, image_size: int, resize: str, pooling: str, layer: str, augment=()
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """(model, train_model, core) around an existing cut backbone and head model."""
    from .backbones.build import _pool

    for lyr in cut.layers:
        if isinstance(lyr, keras.layers.BatchNormalization):
            lyr.trainable = False
    inp = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = Preprocess(fm.spec.preprocess, name="preprocess")(inp)
    x = FrozenBackbone(cut, name="backbone")(x)
    x = _pool(x, pooling, layer)
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


def rebuild(run_dir: str | Path, *, augment=(), check_rows: int = 256) -> Rebuilt:
    """The end-to-end Keras model of a stage-2 run, its head verified against scikit-learn."""
    from .runs import load_run

    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    metrics, pipeline = loaded.metrics, loaded.model
    source = run_source(metrics)
    class_names = list(metrics["class_names"])
    n_features = int(metrics["n_features"])
    calibrated = str(metrics.get("probabilities", "predict_proba")) == "predict_proba"
    head = build_head_model(pipeline, n_features, len(class_names), calibrated)
    head_check = _check_head(head, pipeline, source, len(class_names), check_rows)
    fm, cut = _backbone_cut(source)
    pooling = source.backbone.get("pooling", "avg")
    model, train_model, core = assemble(
        fm, cut, head, source.image_size, source.resize, pooling, source.layer, augment
    )
    return Rebuilt(
        model, train_model, core, head, cut, class_names, source.image_size, source.resize, source,
        run_dir, metrics, pipeline, calibrated, head_check,
    )  # fmt: skip


def _check_head(head, pipeline, source: RunSource, n_classes: int, n_rows: int) -> float | None:
    """Converted head vs the scikit-learn pipeline on cached features (val rows first): raise if they differ."""
    if source.cache_path is None:
        return None
    from .store import FeatureCache

    with FeatureCache(source.cache_path) as c:
        rows = np.concatenate([c.rows("val"), c.rows("test"), c.rows("train")])[:n_rows]
        X = c.features(source.layer, np.sort(rows))
    want, _ = stage2_scores(pipeline, X, n_classes)
    got = np.asarray(head(X.astype(np.float32), training=False), np.float64)
    diff = float(np.max(np.abs(got - want))) if len(X) else 0.0
    if not diff <= HEAD_TOLERANCE:
        raise FeatcacheError(
            f"internal: the converted head differs from the scikit-learn head by {diff:.2e} (> {HEAD_TOLERANCE}); "
            "please report this"
        )
    return diff


# --------------------------------------------------------------------------------------------- images


def cache_dataset(meta: dict[str, Any]):
    """The dataset a cache was extracted from (``load_dataset`` on the cache's own data config)."""
    from .config import DataConfig
    from .sources import load_dataset

    data = _known_fields(DataConfig, (meta.get("config") or {}).get("data", {}))
    src = str(data.get("source", ""))
    if (
        src.strip() not in ("fashion_mnist", "fashion-mnist")
        and meta.get("source")
        and Path(meta["source"]).exists()
    ):
        data["source"] = meta["source"]  # absolute: the cache may be used from another working directory
    data["on_error"] = "skip"
    return load_dataset(DataConfig(**data))


def is_view_key(key: str) -> bool:
    return VIEW_SUFFIX in key


def samples_for_rows(cache, ds, rows: np.ndarray):
    """(rows kept, their samples, keys missing from the dataset); augmented-view rows are never images."""
    by_key = {s.key: s for s in ds.samples}
    kept, samples, missing = [], [], []
    for r in np.asarray(rows):
        key = cache.keys[int(r)]
        if is_view_key(key):
            continue
        s = by_key.get(key)
        if s is None:
            missing.append(key)
            continue
        kept.append(int(r))
        samples.append(s)
    return np.asarray(kept, np.int64), samples, missing


def image_batches(ds, samples, size: int, policy: str, batch_size: int):
    """tf.data of (index, S×S images, ok, why): :func:`pipeline.extract.make_image_dataset`, the same pixels
    extraction fed the backbone."""
    from .extract import make_image_dataset

    return make_image_dataset(ds, samples, size, policy, batch_size)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model):
    """``model(x, training=False)`` as one tf.function per model (tracing a backbone costs seconds)."""
    fn = _COMPILED.get(model)
    if fn is None:
        ref = weakref.ref(model)  # the cache must not keep the model alive
        fn = _COMPILED[model] = tf.function(lambda x: ref()(x, training=False), reduce_retracing=True)
    return fn


def predict_images(model, ds, samples, size: int, policy: str, batch_size: int = 32):
    """Probabilities of ``model`` on ``samples`` (decoded + resized like extraction); (proba, ok mask)."""
    fn = compiled(model)
    n = len(samples)
    out, ok_all = None, np.zeros(n, bool)
    for idx, images, ok, _ in image_batches(ds, samples, size, policy, batch_size):
        p = fn(images).numpy()
        if out is None:
            out = np.zeros((n, p.shape[1]), np.float64)
        idx, ok = idx.numpy(), ok.numpy()
        out[idx] = p
        ok_all[idx] = ok
    return (out if out is not None else np.zeros((0, 0))), ok_all


def equivalence(rebuilt: Rebuilt, split: str = "val", batch_size: int = 32, limit: int = 0) -> dict[str, Any]:
    """Max |Δ probability| between the rebuilt model on the split's images and stage 2 on its cached rows."""
    from .store import FeatureCache

    if rebuilt.source.cache_path is None:
        raise FeatcacheError("equivalence needs the run's cache, which is gone")
    with FeatureCache(rebuilt.source.cache_path) as c:
        ds = cache_dataset(c.meta)
        rows, samples, missing = samples_for_rows(c, ds, c.rows(split))
        if limit:
            rows, samples = rows[:limit], samples[:limit]
        X = c.features(rebuilt.source.layer, rows)
    want, _ = stage2_scores(rebuilt.pipeline, X, rebuilt.n_classes)
    got, ok = predict_images(rebuilt.model, ds, samples, rebuilt.image_size, rebuilt.resize, batch_size)
    if len(rows) == 0 or not ok.any():
        return {"split": split, "n": 0, "max_abs_diff": None}
    diff = np.abs(got[ok] - want[ok])
    return {
        "split": split,
        "n": int(ok.sum()),
        "max_abs_diff": float(diff.max()),
        "same_predictions": int((got[ok].argmax(1) == want[ok].argmax(1)).sum()),
        "missing": len(missing),
    }


def load_keras(path: str | Path) -> keras.Model:
    """A ``.keras`` file written by featcache (safe mode: no code is deserialized)."""
    try:
        return keras.saving.load_model(Path(path), safe_mode=True, compile=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise FeatcacheError(
            f"{path}: cannot load the Keras model ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def model_input(model) -> tuple[int | None, str]:
    """(S, resize policy) of a featcache end-to-end model; (None, "stretch") for a foreign model."""
    for layer in model.layers:
        if isinstance(layer, ResizeImages):
            return layer.size, layer.policy
    shape = model.inputs[0].shape
    return (int(shape[1]) if shape[1] is not None else None), "stretch"


def write_sidecar(path: Path, rebuilt_or_info: dict[str, Any]) -> None:
    from .runs import write_json

    write_json(path, rebuilt_or_info)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


__all__ = [
    "AUGMENTATIONS",
    "EQUIVALENCE_TOLERANCE",
    "FrozenBackbone",
    "L2Normalize",
    "NotConvertible",
    "PCAProject",
    "Rebuilt",
    "ScoresToProba",
    "Standardize",
    "augmentation_layers",
    "build_head_model",
    "equivalence",
    "rebuild",
]


from ._callable import callable_module  # noqa: E402

callable_module(__name__, "rebuild")
