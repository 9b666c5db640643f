"""The one resize function and the in-graph preprocessing layers (a keras.applications mode, or a KerasHub
preset's scale and offset).

Extraction, fine-tuning, prediction and export all call :func:`resize_images` and :class:`Preprocess`,
so every stage feeds the backbone exactly the same pixels. Both are plain TensorFlow ops, usable inside a
``tf.data`` map and inside a Keras model (as :class:`ResizeImages`), and serializable in ``.keras`` files.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.data.area import PAD_VALUE

# Per-mode constants of keras.applications' preprocess_input, restated so the layer is self-contained.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


_TORCH_MEAN = (0.485, 0.456, 0.406)


_TORCH_STD = (0.229, 0.224, 0.225)


PREPROCESS_MODES = ("caffe", "tf", "torch", "lite", "none")


def _resize(x: tf.Tensor, h, w) -> tf.Tensor:
    """N×H×W×C (uint8 or float) → N×h×w×C float32, antialiased both ways.

    Shrinking on both axes uses area averaging (a box filter as wide as the scale: no aliasing, and a
    third of the cost of ``tf.image.resize(antialias=True)``, the largest CPU cost of extraction after
    the backbone). Anything else (upscaling, or one axis up and one down) uses antialiased bilinear.
    Same-size input comes back unchanged.
    """
    shape = tf.shape(x)
    shrink = tf.logical_and(shape[1] >= h, shape[2] >= w)
    size = tf.stack([h, w])
    return tf.cond(
        shrink,
        lambda: tf.image.resize(x, size, method="area"),  # reads uint8 as is: no full-size float copy
        lambda: tf.image.resize(tf.cast(x, tf.float32), size, method="bilinear", antialias=True),
    )


def resize_images(images: tf.Tensor, size: int, policy: str = "stretch") -> tf.Tensor:
    """Resize an H×W×C image or an N×H×W×C batch of raw pixels to ``size``×``size``, float32, 0..255.

    ``stretch`` ignores the aspect ratio, ``crop`` takes the central square, ``pad`` letterboxes.
    Antialiased (see :func:`_resize`), so downscaling large photos does not alias.
    """
    x = tf.convert_to_tensor(images)  # cast to float only after shrinking (bit-identical, cheaper)
    batched, channels = x.shape.rank == 4, x.shape[-1]
    if not batched:
        x = x[None]
    shape = tf.shape(x)
    h, w = shape[1], shape[2]
    if policy == "crop":
        side = tf.minimum(h, w)
        x = x[:, (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side, :]
        x = _resize(x, size, size)
    elif policy == "pad":
        scale = tf.cast(size, tf.float32) / tf.cast(tf.maximum(h, w), tf.float32)
        nh = tf.maximum(1, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
        nw = tf.maximum(1, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
        x = _resize(x, nh, nw)
        top, left = (size - nh) // 2, (size - nw) // 2
        x = tf.pad(
            x, [[0, 0], [top, size - nh - top], [left, size - nw - left], [0, 0]], constant_values=PAD_VALUE
        )
    elif policy == "stretch":
        x = _resize(x, size, size)
    else:
        raise ValueError(f"unknown resize policy {policy!r}")
    x = tf.ensure_shape(x, [None, size, size, channels])
    return x if batched else x[0]


@keras.saving.register_keras_serializable(package="featcache")
class ResizeImages(keras.layers.Layer):
    """:func:`resize_images` as a layer, for end-to-end models that take raw images of any size."""

    def __init__(self, size: int, policy: str = "stretch", **kwargs):
        super().__init__(**kwargs)
        self.size, self.policy = int(size), policy

    def call(self, x):
        return resize_images(x, self.size, self.policy)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": self.size, "policy": self.policy}


@keras.saving.register_keras_serializable(package="featcache")
class Preprocess(keras.layers.Layer):
    """A backbone's input convention, inside the graph: raw RGB 0..255 in, what the weights expect out."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = tf.cast(x, tf.float32)
        if self.mode == "caffe":
            return x[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, tf.float32)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - tf.constant(_TORCH_MEAN)) / tf.constant(_TORCH_STD)
        if self.mode == "lite":
            return (x - 127.0) / 128.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="featcache")
class ScaleOffset(keras.layers.Layer):
    """A KerasHub image converter's normalization, inside the graph: ``x * scale + offset`` on raw RGB 0..255.

    ``scale`` and ``offset`` are what the preset's ``image_converter.json`` holds: None (no change), one
    number, or one per channel (mean/std folded in: ``scale = 1/(255·std)``, ``offset = -mean/std``).
    """

    def __init__(self, scale=None, offset=None, **kwargs):
        super().__init__(**kwargs)
        self.scale = list(scale) if isinstance(scale, (list, tuple)) else scale
        self.offset = list(offset) if isinstance(offset, (list, tuple)) else offset

    def call(self, x):
        x = tf.cast(x, tf.float32)
        if self.scale is not None:
            x = x * tf.constant(self.scale, tf.float32)
        if self.offset is not None:
            x = x + tf.constant(self.offset, tf.float32)
        return x

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}
