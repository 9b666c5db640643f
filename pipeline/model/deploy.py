"""The deployable files of an end-to-end model: TFLite classifiers and embedders that MediaPipe Tasks loads as
they are, and ONNX. ``export`` writes and checks them; this module only makes their bytes.

Every file takes the S×S core's input: N×S×S×3 float32 raw RGB 0..255 (preprocessing is inside the graph).
"""

from __future__ import annotations

import contextlib

import numpy as np

from pipeline.features.tflite import check_conversion_memory, convert_frozen, freeze
from pipeline.utils.errors import FeatcacheError, first_line

#: ``--format`` name of each TFLite classifier → its conversion mode.
TFLITE_MODES = {"tflite": "float", "tflite-dynamic": "dynamic", "tflite-int8": "int8"}


def tflite_convert(core, image_size: int, mode: str, representative=None) -> bytes:
    """Convert the S×S core model; ``mode``: float | dynamic | int8 (float32 input and output)."""
    from pipeline.model.layers import quantizable

    check_conversion_memory("the model", core)  # a clear error, not the kernel's OOM killer
    # quantized files trace the int8-friendly form of the head's transforms (same function, see quantizable)
    with quantizable(core) if mode != "float" else contextlib.nullcontext():
        frozen = freeze(lambda x: core(x, training=False), image_size)
    try:
        return convert_frozen(frozen, mode, representative)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the converter raises many types
        raise FeatcacheError(f"TFLite conversion ({mode}) failed: {first_line(e, 300)}") from None


def tflite_classifier(
    core, image_size: int, mode: str, class_names: list[str], multilabel: bool, representative=None
) -> bytes:
    """A TFLite classifier (``mode`` as :func:`tflite_convert`) with MediaPipe ``ImageClassifier`` metadata."""
    from pipeline.model.tasks_metadata import classifier_metadata

    return classifier_metadata(
        tflite_convert(core, image_size, mode, representative), class_names, multilabel
    )


def embedding_model(core):
    """The backbone alone of an end-to-end core: N×S×S×3 raw pixels → the feature its head reads (for a
    stage-2 run, the cached feature: same preprocessing, cut and pooling)."""
    import keras

    *body, head = core.layers  # a chain: image, preprocessing, backbone, pooling (when any), head
    if head.name != "head" or len(body) < 3:
        raise FeatcacheError("internal: not a featcache core model (image → backbone → head)")
    return keras.Model(core.inputs, body[-1].output, name="embedder")


def tflite_embedder(core, image_size: int) -> bytes:
    """The float TFLite file of :func:`embedding_model` with MediaPipe ``ImageEmbedder`` metadata."""
    from pipeline.model.tasks_metadata import available, embedder_metadata

    model = tflite_convert(embedding_model(core), image_size, "float")
    return embedder_metadata(model) if available() else model


def min_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """The smallest cosine similarity between the rows of ``a`` and ``b`` (None for no rows)."""
    if not len(a):
        return None
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))


def embedder_cosines(run, core, images: np.ndarray, cached: np.ndarray | None, batch: int = 64) -> dict:
    """How close an embedder (``run``: images → features) is to the Keras backbone of ``core`` and to the
    cached features of the same images: ``min_cosine`` and ``min_cosine_cache`` (None without a cache)."""
    from pipeline.model.runners import keras_runner

    keras_emb = keras_runner(embedding_model(core))
    got = [run(images[i : i + batch]) for i in range(0, len(images), batch)]
    want = [keras_emb(images[i : i + batch]) for i in range(0, len(images), batch)]
    if not got:
        return {"min_cosine": None, "min_cosine_cache": None}
    got = np.concatenate(got)
    return {
        "min_cosine": min_cosine(got, np.concatenate(want)),
        "min_cosine_cache": None if cached is None else min_cosine(got, cached),
    }
