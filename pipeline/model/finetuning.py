"""The rebuilt model made trainable: which layers unfreeze, its optimizer, its input while training, its
evaluation on a split's images, and the per-epoch checkpoint that makes fine-tuning resumable.

Keras and TensorFlow are imported inside the functions, so the stage can check its settings
(:func:`parse_unfreeze`) before either loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.images import SplitImages
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, json_default


def parse_unfreeze(spec: str) -> tuple[str, int]:
    """``none`` | ``all`` | ``top:N`` → (mode, N)."""
    s = str(spec).strip().lower()
    if s in ("none", "all"):
        return s, 0
    mode, _, n = s.partition(":")
    if mode == "top" and n.isdigit() and int(n) >= 1:
        return "top", int(n)
    raise FeatcacheError(f"finetune.unfreeze must be none, all or top:N (N >= 1), got {spec!r}")


def trainable_candidates(backbone) -> list:
    """Backbone layers that may be unfrozen, bottom to top: those with weights, BatchNorm excluded."""
    import keras

    return [
        layer
        for layer in backbone.layers
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]


def top_units(cands: list, n: int) -> list:
    """The top ``n`` of ``cands``: layers, or for a transformer its last ``n`` blocks and all after them (the
    final norm, a pooling head)."""
    from pipeline.features.backbones.keras_hub import is_block

    blocks = [i for i, layer in enumerate(cands) if is_block(layer)]
    return cands[blocks[max(0, len(blocks) - n)] :] if blocks else cands[-n:]


def set_trainable(rebuilt, spec: str) -> dict[str, Any]:
    """Freeze the backbone except the layers ``spec`` names; BatchNorm stays frozen; the head trains."""
    import keras

    mode, n = parse_unfreeze(spec)
    cands = trainable_candidates(rebuilt.backbone)
    chosen = [] if mode == "none" else cands if mode == "all" else top_units(cands, n)
    for layer in rebuilt.backbone.layers:
        layer.trainable = False
    for layer in chosen:
        layer.trainable = True
    bn = 0
    for layer in rebuilt.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            bn += 1
    for layer in rebuilt.head.layers:
        layer.trainable = True
    return {
        "unfreeze": spec,
        "unfrozen_layers": [layer.name for layer in chosen],
        "backbone_layers_with_weights": len(cands),
        "batchnorm_frozen": bn,
        "trainable_params": int(sum(np.prod(w.shape) for w in rebuilt.train_model.trainable_weights)),
    }


def compile_model(rebuilt, learning_rate: float) -> None:
    """(Re)compile after changing ``trainable``: outputs are probabilities, labels are class indices (a
    multi-label run: per-class sigmoids against multi-hot rows, binary cross-entropy, and as ``accuracy``
    the share of (image, class) decisions right at 0.5)."""
    import keras

    if rebuilt.multilabel:
        loss, acc = keras.losses.BinaryCrossentropy(), keras.metrics.BinaryAccuracy(name="accuracy")
    else:
        loss, acc = (
            keras.losses.SparseCategoricalCrossentropy(),
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
        )
    rebuilt.train_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(learning_rate)), loss=loss, metrics=[acc]
    )


def labelled_dataset(
    ds, part: SplitImages, size: int, policy: str, batch_size: int, shuffle_seed: int | None, *, decode: str
):
    """tf.data of (images, labels, weights) batches in a seeded order; an image that cannot be read any more
    (it was quarantined at extraction) gets weight 0, so every batch keeps its known size. Labels are class
    indices, or a multi-label cache's multi-hot rows (as float32, what binary cross-entropy takes)."""
    import tensorflow as tf

    from pipeline.data.images import image_batches

    order = np.arange(len(part.samples))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(order))
    samples = [part.samples[i] for i in order]
    multi_hot = np.ndim(part.labels) == 2
    labels = tf.constant(part.labels[order].astype(np.float32 if multi_hot else np.int64))

    @tf.autograph.experimental.do_not_convert
    def with_labels(idx, images, ok, why):
        return images, tf.gather(labels, idx), tf.reshape(tf.cast(ok, tf.float32), [-1])

    return image_batches(ds, samples, size, policy, batch_size, decode=decode).map(with_labels)


def evaluate(model, ds, part: SplitImages, rebuilt, batch_size: int, calibrated: bool, thresholds=None):
    """(stage-2-format metrics, probabilities, readable mask) of ``model`` on a split's images; a multi-label
    run's at ``thresholds`` (one per class; None: chosen on these images, as stage 2 chooses them on val)."""
    from pipeline.model.runners import predict_images

    if not len(part.rows):
        return {"n": 0}, np.zeros((0, rebuilt.n_classes)), np.zeros(0, bool)
    proba, ok = predict_images(
        model, ds, part.samples, rebuilt.image_size, rebuilt.resize, batch_size, decode=rebuilt.decode
    )
    return score_split(part, proba, ok, rebuilt, calibrated, thresholds), proba, ok


def score_split(part: SplitImages, proba, ok, rebuilt, calibrated: bool, thresholds=None) -> dict[str, Any]:
    """Stage 2's metrics of the readable rows' probabilities (multi-label: :func:`multilabel_metrics`)."""
    from pipeline.heads.fitting import Predictions
    from pipeline.heads.metrics import classification_metrics, multilabel_metrics
    from pipeline.heads.multilabel import above, choose_thresholds

    y, p = part.labels[ok], proba[ok]
    if not rebuilt.multilabel:
        pred = Predictions(part.rows[ok], y, p.argmax(1), p, calibrated)
        return classification_metrics(pred, rebuilt.class_names)
    if thresholds is None:
        thresholds = choose_thresholds(y, p)
    pred = Predictions(part.rows[ok], y, above(p, thresholds), p, calibrated)
    return multilabel_metrics(pred, rebuilt.class_names, np.asarray(thresholds, np.float64))


def loss_and_hits(proba: np.ndarray, labels: np.ndarray) -> tuple[float, float, int]:
    """What Keras reports for these probabilities (epoch 0 of the learning curves): (mean loss, right
    decisions, decisions). Class indices: sparse categorical cross-entropy, one decision per image (its top
    class); multi-hot rows: binary cross-entropy, one decision per image and class (Keras' binary accuracy,
    ``p > 0.5``). Probabilities are clipped at Keras' epsilon, 1e-7."""
    eps = 1e-7
    if np.ndim(labels) == 2:
        y = np.asarray(labels, np.float64)
        p = np.clip(proba, eps, 1 - eps)
        loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
        return float(loss), float(((proba > 0.5) == (y > 0.5)).sum()), int(y.size)
    labels = np.asarray(labels, int)
    p = np.clip(proba[np.arange(len(labels)), labels], eps, 1.0)
    return float(-np.log(p).mean()), float((proba.argmax(1) == labels).sum()), len(labels)


def stage2_thresholds(rebuilt):
    """The stage-2 run's per-class thresholds (multi-label), or None."""
    return np.asarray(rebuilt.metrics.thresholds, np.float64) if rebuilt.multilabel else None


def rechoose_thresholds(rebuilt, val: SplitImages, p_val, ok_val, notes: list[str]):
    """A multi-label run's per-class thresholds chosen on val for the fine-tuned model, as stage 2 chose
    them for its head (0.5 each without val images); None for a single-label run."""
    if not rebuilt.multilabel:
        return None
    from pipeline.heads.multilabel import choose_thresholds

    if not len(val.rows) or not ok_val.any():
        notes.append("no val images to choose the thresholds on: every class's threshold is 0.5")
        return np.full(rebuilt.n_classes, 0.5)
    return choose_thresholds(val.labels[ok_val], p_val[ok_val])


def task_fields(rebuilt, thresholds) -> dict[str, Any]:
    """A multi-label run's ``task`` and per-class ``thresholds`` (as stage-2 runs record them); {} else."""
    if not rebuilt.multilabel:
        return {}
    from pipeline.utils.config import MULTILABEL

    return {"task": MULTILABEL, "thresholds": dict(zip(rebuilt.class_names, thresholds, strict=True))}


class Checkpoint:
    """``checkpoint/state.json`` names the files of the last finished epoch; every file is written under a
    temporary name and renamed, and state.json last, so a kill at any moment leaves a consistent checkpoint."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "checkpoint"
        self.state_path = self.dir / "state.json"

    def load(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise FeatcacheError(
                f"{self.state_path}: unreadable checkpoint ({e}); delete {self.dir} to restart"
            ) from None
        for key in ("weights", "optimizer", "best_weights"):
            name = state.get(key)
            if name and not (self.dir / name).is_file():
                raise FeatcacheError(
                    f"{self.dir / name}: checkpoint file missing; delete {self.dir} to restart"
                )
        return state

    def _atomic(self, name: str, write) -> None:
        # the temporary name keeps the whole name at its end: Keras insists on ``.weights.h5``
        with atomic_path(self.dir / name, self.dir / f".tmp-{os.getpid()}-{name}") as tmp:
            write(tmp)

    def write_state(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._atomic("state.json", lambda p: p.write_text(json.dumps(state, indent=1, default=json_default)))

    def save_epoch(self, state: dict[str, Any], train_model, improved: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        e = state["epoch"]
        weights, opt = f"epoch-{e}.weights.h5", f"epoch-{e}.optimizer.npz"
        self._atomic(weights, lambda p: train_model.save_weights(str(p)))
        variables = [np.asarray(v.numpy()) for v in train_model.optimizer.variables]

        def write_opt(p):
            with open(p, "wb") as f:
                np.savez(f, *variables)

        self._atomic(opt, write_opt)
        state["weights"], state["optimizer"] = weights, opt
        if improved:
            state["best_weights"] = weights
        self.write_state(state)
        keep = {"state.json", state["weights"], state["optimizer"], state.get("best_weights")}
        for p in self.dir.iterdir():
            if p.name not in keep and not p.name.startswith(".tmp-"):
                with contextlib.suppress(OSError):
                    p.unlink()

    def restore(self, state: dict[str, Any], train_model) -> None:
        train_model.load_weights(str(self.dir / state["weights"]))
        opt = train_model.optimizer
        if not opt.built:
            opt.build(train_model.trainable_variables)
        with np.load(self.dir / state["optimizer"]) as z:
            values = [z[f"arr_{i}"] for i in range(len(z.files))]
        if len(values) != len(opt.variables) or any(
            tuple(v.shape) != tuple(a.shape) for v, a in zip(opt.variables, values, strict=True)
        ):
            raise FeatcacheError(f"{self.dir}: checkpoint does not match this model; delete it to restart")
        for v, a in zip(opt.variables, values, strict=True):
            v.assign(a)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
