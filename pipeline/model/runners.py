"""Running end-to-end Keras models: loading ``.keras`` files, compiled predict functions, sidecars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import pipeline.model.layers  # noqa: F401 - registers the custom layers a featcache .keras file holds
from pipeline.data.images import image_batches
from pipeline.data.preprocess import ResizeImages
from pipeline.features.backbones.keras_hub import load_objects
from pipeline.features.compiled import compiled
from pipeline.utils.errors import FeatcacheError


class KerasRunner:
    """``model(x, training=False)`` on numpy batches, compiled once; holds the model itself.

    :func:`compiled` keeps only a weak reference to the model (its per-model cache must not keep models
    alive), so whoever runs a model must own it: a runner built from a freshly loaded ``.keras`` file would
    otherwise call a model the garbage collector has already freed.
    """

    def __init__(self, model) -> None:
        self.model = model  # the strong reference: the model lives as long as the runner
        self._fn = compiled(model)

    def __call__(self, x) -> np.ndarray:
        return self._fn(x).numpy()


def keras_runner(model) -> KerasRunner:
    return KerasRunner(model)


def savedmodel_runner(path: Path):

    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures.get("serve") or loaded.signatures["serving_default"]
    (key,) = fn.structured_outputs.keys()
    arg = next(iter(fn.structured_input_signature[1]))
    return lambda x: fn(**{arg: tf.constant(np.asarray(x, np.float32))})[key].numpy()


def predict_images(model, ds, samples, size: int, policy: str, batch_size: int = 32, *, decode: str):
    """Probabilities of ``model`` on ``samples`` (decoded + resized like extraction); (proba, ok mask)."""
    fn = compiled(model)
    n = len(samples)
    out, ok_all = None, np.zeros(n, bool)
    for idx, images, ok, _ in image_batches(ds, samples, size, policy, batch_size, decode=decode):
        p = fn(images).numpy()
        if out is None:
            out = np.zeros((n, p.shape[1]), np.float64)
        idx, ok = idx.numpy(), ok.numpy()
        out[idx] = p
        ok_all[idx] = ok
    return (out if out is not None else np.zeros((0, 0))), ok_all


def _config_text(path: Path) -> str:
    """The model config inside a ``.keras`` file ("" if it is not one: loading then says why)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.read("config.json").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return ""


def load_keras(path: str | Path) -> keras.Model:
    """A ``.keras`` file written by featcache (safe mode: no code is deserialized)."""
    try:
        with keras.saving.CustomObjectScope(load_objects(_config_text(Path(path)))):
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


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
