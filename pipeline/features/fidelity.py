"""The fidelity gate of ``extract.engine=tflite-dynamic``: its features against float32's on the dataset's own images.

Dynamic-range int8 keeps int8 weights and quantizes activations per row at run time, so there is nothing to
calibrate and one converted model serves every dataset. How far it moves a feature depends on the weights
(trained transformers have outlier activations random weights lack) and on the images, so each *gate set*
— a sample of the dataset's train images, chosen as ``tflite-int8`` chooses its calibration set
(:func:`pipeline.features.calibration.for_config`) — is checked once: the per-image cosine of the engine's
features to TensorFlow float32's, mean and minimum over the images (the worst layer of each). Below
:data:`MIN_MEAN_COSINE` or :data:`MIN_COSINE` the engine refuses in one line with the figures. The figures
are remembered in the converted model's sidecar (per gate set: a rerun does not measure again) and the
extraction records them in the cache (attribute ``engine_fidelity``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.features.probes import cosine_stats
from pipeline.features.tflite import EngineUnavailable
from pipeline.utils.io import atomic_write

#: The floor: the mean per-image cosine to float32 on the gate set. Dynamic-range int8 measured 0.9998 on
#: random-weight ViT-S/14 and ViT-B/16 and on a ViT trained on Fashion-MNIST (tests/test_dynamic.py); a
#: model far below has activations int8 rows cannot hold, and its features would not be float32's.
MIN_MEAN_COSINE = 0.995

#: The floor for the worst image of the gate set: one image whose features turned is a model to refuse too.
MIN_COSINE = 0.98


def gate_name(calibration) -> str:
    """How a gate set is named in the sidecar: its identity (source, count, digest of its content digests)."""
    return json.dumps(dict(calibration.key), sort_keys=True)


def measure(engine, reference, images) -> dict[str, Any]:
    """The figures of ``engine`` against ``reference`` (float32) on ``images``."""
    mean, low = cosine_stats(engine(images), reference(images))
    return {"images": len(images), "mean_cosine": round(mean, 5), "min_cosine": round(low, 5)}


def check(fidelity: dict[str, Any], backbone: str) -> dict[str, Any]:
    """``fidelity`` with the floor it passed; raises :class:`EngineUnavailable` in one line below it."""
    mean, low, n = fidelity["mean_cosine"], fidelity["min_cosine"], fidelity["images"]
    if not (mean >= MIN_MEAN_COSINE and low >= MIN_COSINE):
        raise EngineUnavailable(
            f"extract.engine=tflite-dynamic: {backbone}'s dynamic-range int8 features are too far from "
            f"float32's on {n} of the dataset's train images (cosine mean {mean:.5f}, min {low:.5f}; the floor "
            f"is {MIN_MEAN_COSINE} / {MIN_COSINE}); use extract.engine=tflite"
        )
    return {**fidelity, "floor": [MIN_MEAN_COSINE, MIN_COSINE]}


def gate(
    backbone: str,
    engine,
    meta: dict[str, Any],
    meta_path: Path | None,
    calibration,
    reference: Callable[[], Any],
    image_size: int,
) -> dict[str, Any]:
    """Check ``engine`` on the gate set ``calibration`` (measured once, then read from the sidecar ``meta``
    kept at ``meta_path``); ``reference()`` builds the float32 engine only when a measure is needed."""
    name = gate_name(calibration)
    gates = meta.setdefault("gates", {})
    if name not in gates:
        gates[name] = measure(engine, reference(), calibration.images(image_size))
        if meta_path is not None:
            kept = {k: v for k, v in meta.items() if k != "path"}
            atomic_write(meta_path, json.dumps(kept, indent=1, sort_keys=True).encode())
    return check(gates[name], backbone)
