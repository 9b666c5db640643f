"""Keras layers of the rebuilt model: the frozen backbone wrapper and the head's transforms as layers.

All are registered under ``featcache>`` so ``.keras`` files load with ``safe_mode=True``.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf


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


class Quantizable:
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
        if isinstance(layer, Quantizable):
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
class Standardize(Quantizable, keras.layers.Layer):
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
class PCAProject(Quantizable, keras.layers.Layer):
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
    ``KerasHead.predict_proba`` does), ``binary_logit`` (a Keras head's single logit z → ``[1-σ(z), σ(z)]``),
    ``sigmoid`` (one sigmoid per class, not normalised: SigLIP's zero-shot probabilities).
    """

    MODES = ("softmax", "ovr", "normalize", "binary_logit", "sigmoid")

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
        if self.mode == "sigmoid":
            return tf.sigmoid(x)
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
