"""Augmentation: the random layers fine-tuning trains with, and the augmented-view rows a cache can hold."""

from __future__ import annotations

import numpy as np

from pipeline.utils.errors import FeatcacheError

VIEWS_RECIPE = 1  # bump when the augmentation factors in pipeline.model.rebuild.augmentation_layers change


VIEW_SUFFIX = "#aug"  # in the key of a view row; such rows have no image of their own


#: Augmentations known to ``finetune.augment``; factors are fixed (documented in the README).
AUGMENTATIONS = ("flip", "rotation", "zoom", "translation", "contrast")


def augmentation_layers(names: list[str] | tuple[str, ...], seed: int = 0) -> list:
    """Keras' random image layers for ``finetune.augment`` (active only when ``training=True``)."""
    import keras

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


def is_view_key(key: str) -> bool:
    return VIEW_SUFFIX in key


def view_mask(keys) -> np.ndarray:
    """Which of ``keys`` (a list, or a NumPy array of str) are views: one boolean array, no object per row."""
    if isinstance(keys, np.ndarray):
        return np.strings.find(keys.astype(str, copy=False), VIEW_SUFFIX) >= 0
    return np.fromiter((VIEW_SUFFIX in k for k in keys), bool, len(keys))


def augmented_view(layers: list, image, digest: str, view: int):
    """View ``view`` of ``image`` (its content ``digest``), the same whatever the batch: every random draw
    of ``layers`` (:func:`augmentation_layers`) is seeded by (digest, view)."""
    seed = int(digest[:8], 16)
    x = image[None]
    for j, layer in enumerate(layers):
        t = layer.get_random_transformation(x, training=True, seed=(seed + 7919 * j + view) & 0x7FFFFFFF)
        x = layer.transform_images(x, t, training=True)
    return np.asarray(x[0], np.float32)
