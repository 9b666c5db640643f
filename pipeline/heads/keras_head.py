"""``KerasHead``: a small Keras classifier as a scikit-learn estimator, fitted in memory or from a stream."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.utils.errors import FeatcacheValueError

#: scikit-learn estimator checks that cannot hold for a stochastic Keras fit, each with the reason; pass to
#: ``check_estimator(..., expected_failed_checks=KERAS_HEAD_EXPECTED_FAILURES)``
KERAS_HEAD_EXPECTED_FAILURES: dict[str, str] = {
    "check_sample_weight_equivalence_on_dense_data": (
        "mini-batch SGD: repeating a row changes the batches and the number of steps, so weight 2 and a"
        " repeated row give different (equally valid) fits; the weights act on the loss, not the data"
    ),
}

#: a held-out part smaller than this makes early stopping follow noise: ``fit`` then trains on every row
MIN_VAL_ROWS = 50

#: optimizer steps per compiled call: the same steps and results without Python's cost on each (~2× faster)
STEPS_PER_EXECUTION = 32

#: predictions on at most this many rows are one call: tracing a predict function costs more than it saves
EAGER_ROWS = 4096


def encode_labels(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(classes, y)
    idx = np.clip(idx, 0, len(classes) - 1)
    if not np.array_equal(classes[idx], y):
        raise FeatcacheValueError("labels outside the classes the head was fitted on")
    return idx


def class_weights(classes: np.ndarray, y: np.ndarray, spec: Any) -> dict[int, float] | None:
    """``None`` | ``"balanced"`` | {label: weight} → weight per *class position*, as Keras and our chunks use."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise FeatcacheValueError(f"class_weight must be 'balanced', a mapping or none, got {spec!r}")
        counts = np.array([(y == c).sum() for c in classes], dtype=np.float64)
        return {i: float(len(y) / (len(classes) * max(c, 1.0))) for i, c in enumerate(counts)}
    if isinstance(spec, dict):
        lookup = {str(k): float(v) for k, v in spec.items()}
        return {i: lookup.get(str(c), 1.0) for i, c in enumerate(classes)}
    raise FeatcacheValueError(f"class_weight must be 'balanced', a mapping or none, got {spec!r}")


def positive_weights(Y: np.ndarray, spec: Any) -> np.ndarray | None:
    """A multi-label head's weight on each class's positives: ``"balanced"`` is negatives / positives of the
    class (so its positive and negative rows weigh the same in the loss, as ``pos_weight`` of a weighted
    binary cross-entropy), ``None`` is 1 everywhere. A class with no positive, or with no negative (a
    weight of 0 would silence its only kind of row), keeps weight 1."""
    if spec is None:
        return None
    if spec != "balanced":
        raise FeatcacheValueError(
            'a multi-label head takes class_weight = "balanced" only (weighted per class)'
        )
    pos = Y.sum(axis=0).astype(np.float64)
    ok = (pos > 0) & (pos < len(Y))
    return np.where(ok, (len(Y) - pos) / np.maximum(pos, 1.0), 1.0).astype(np.float32)


def weighted_bce(pos_weight: np.ndarray):
    """Binary cross-entropy of sigmoid outputs with each class's positive term weighted (training only:
    the saved model is compiled with Keras's own loss, so loading it needs no custom object)."""
    from keras import ops

    pw = ops.convert_to_tensor(np.asarray(pos_weight, np.float32))

    def loss(y, p):
        p = ops.clip(p, 1e-7, 1.0 - 1e-7)
        return ops.mean(-(pw * y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p)), axis=-1)

    return loss


class KerasHead(ClassifierMixin, BaseEstimator):
    """A small Keras classifier with the scikit-learn estimator API (fit/predict/predict_proba, clone-able).

    ``hidden=()`` is ``Dense(n, softmax)`` (``Dropout`` + ``Dense(1)`` logit when binary); ``hidden=(256,)``
    adds ``Dense(256, relu)`` layers. ``dropout=None`` means 0.2 for binary and 0 otherwise.

    Fitted on an N×C multi-hot matrix (C ≥ 2 columns of 0/1) it is multi-label (``multilabel_``): ``Dense(C,
    sigmoid)`` with binary cross-entropy per class, ``class_weight="balanced"`` weighting each class's
    positives by its negatives / positives; ``predict_proba`` is the N×C sigmoid scores and ``predict``
    the multi-hot rows at 0.5 (featcache picks a threshold per class on val). Early stopping
    watches ``validation_data`` when given (the cache's val split), else ``validation_fraction`` of the
    training rows when that is at least ``MIN_VAL_ROWS`` rows, so it never needs the test split.

    An epoch is one pass over the training rows, or as many passes as make ``min_epoch_steps`` optimizer
    steps when the rows are few: on a few hundred images, 30 single passes of 64-row batches are ~90 Adam
    steps, far too few to fit, while a large dataset's epochs (and their cost) stay as they are. Patience
    counts epochs, so tiny data also gets enough steps before early stopping can stop it. In memory the
    passes are copies of the rows: at most ``min_epoch_steps × batch_size`` rows more.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (),
        dropout: float | None = None,
        l2: float = 0.0,
        learning_rate: float = 1e-3,
        epochs: int = 30,
        batch_size: int = 64,
        patience: int = 3,
        min_epoch_steps: int = 64,
        class_weight: Any = None,
        validation_fraction: float = 0.1,
        random_state: int = 0,
        verbose: int = 0,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.l2 = l2
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.min_epoch_steps = min_epoch_steps
        self.class_weight = class_weight
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # mini-batch SGD in float32 with shuffling and dropout: refits agree to rounding, not bit for bit
        tags.non_deterministic = True
        tags.input_tags.sparse = False
        return tags

    # -- building
    def _check_params(self) -> None:
        checks = {
            "hidden": all(isinstance(h, (int, np.integer)) and h > 0 for h in self.hidden),
            "dropout": self.dropout is None or 0.0 <= float(self.dropout) < 1.0,
            "l2": float(self.l2) >= 0,
            "learning_rate": float(self.learning_rate) > 0,
            "epochs": int(self.epochs) >= 1,
            "batch_size": int(self.batch_size) >= 1,
            "patience": int(self.patience) >= 0,
            "min_epoch_steps": int(self.min_epoch_steps) >= 1,
            "validation_fraction": 0.0 <= float(self.validation_fraction) < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise FeatcacheValueError(f"keras head: invalid {name}={getattr(self, name)!r}")

    def _build(self, n_features: int, n_classes: int, pos_weight: np.ndarray | None = None):
        import keras

        keras.utils.set_random_seed(int(self.random_state))
        reg = keras.regularizers.L2(float(self.l2)) if self.l2 else None
        multilabel = bool(getattr(self, "multilabel_", False))
        binary = n_classes == 2 and not multilabel
        inputs = keras.Input((n_features,), name="features")
        x = inputs
        for i, units in enumerate(self.hidden):
            x = keras.layers.Dense(int(units), activation="relu", kernel_regularizer=reg, name=f"hidden_{i}")(
                x
            )
        rate = (0.2 if binary else 0.0) if self.dropout is None else float(self.dropout)
        if rate > 0:
            x = keras.layers.Dropout(rate, name="dropout")(x)
        if multilabel:
            out = keras.layers.Dense(n_classes, activation="sigmoid", kernel_regularizer=reg, name="sigmoid")(
                x
            )
            loss = keras.losses.BinaryCrossentropy() if pos_weight is None else weighted_bce(pos_weight)
            metric = keras.metrics.BinaryAccuracy(name="accuracy")
        elif binary:
            out = keras.layers.Dense(1, kernel_regularizer=reg, name="logit")(x)
            loss = keras.losses.BinaryCrossentropy(from_logits=True)
            metric = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
        else:
            out = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg, name="probs")(x)
            loss = keras.losses.SparseCategoricalCrossentropy()
            metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        model = keras.Model(inputs, out, name="head")
        model.compile(
            optimizer=keras.optimizers.Adam(float(self.learning_rate)),
            loss=loss,
            metrics=[metric],
            steps_per_execution=STEPS_PER_EXECUTION,
        )
        return model

    def _callbacks(self, has_val: bool):
        import keras

        if not has_val or self.patience <= 0:
            return []
        return [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=int(self.patience), restore_best_weights=True
            )
        ]

    def _finish(self, history) -> KerasHead:
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        self.n_epochs_ = len(self.history_.get("loss", []))
        if "val_loss" in self.history_:
            self.best_epoch_ = int(np.argmin(self.history_["val_loss"])) + 1
        return self

    # -- fitting
    def fit(
        self, X, y, validation_data: tuple[np.ndarray, np.ndarray] | None = None, sample_weight=None
    ) -> KerasHead:
        """Fit in memory; ``validation_data`` (the val split, raw labels) drives early stopping."""
        self._check_params()
        X, y = self._validate_xy(X, y)
        w = _sample_weight(sample_weight, len(y))
        pos_weight = None
        if self.multilabel_:
            yi, pos_weight = y, positive_weights(y, self.class_weight)
        else:
            yi = encode_labels(self.classes_, y)
            weights = class_weights(self.classes_, y, self.class_weight)
            if weights:
                w = w * np.asarray([weights[i] for i in yi], np.float32)
        if validation_data is not None:
            val = self._encoded_val(validation_data)
        else:
            (X, yi, w), val = self._split_off_val(X, yi, w)
        batch = min(int(self.batch_size), len(yi))
        passes = self._passes(len(yi) / batch)
        if passes > 1:  # Keras shuffles across the copies: each epoch is several shuffled passes
            X, yi, w = (
                np.tile(X, (passes, 1)),
                np.tile(yi, (passes,) + (1,) * (yi.ndim - 1)),
                np.tile(w, passes),
            )
        self.model_ = self._build(X.shape[1], len(self.classes_), pos_weight)
        history = self.model_.fit(
            X,
            self._target(yi),
            sample_weight=w,
            validation_data=None if val is None else (val[0], self._target(val[1]), *val[2:]),
            epochs=int(self.epochs),
            batch_size=batch,
            shuffle=True,
            callbacks=self._callbacks(val is not None),
            verbose=int(self.verbose),
        )
        if pos_weight is not None:  # the saved model holds Keras's own loss, not the training closure
            import keras

            self.model_.compile(
                optimizer=keras.optimizers.Adam(float(self.learning_rate)),
                loss=keras.losses.BinaryCrossentropy(),
                metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
            )
            self.model_.optimizer.build(self.model_.trainable_variables)  # saved and loaded whole
        return self._finish(history)

    def _passes(self, steps_per_pass: float) -> int:
        """Passes over the training rows per epoch: enough for ``min_epoch_steps`` optimizer steps."""
        return max(1, int(np.ceil(int(self.min_epoch_steps) / steps_per_pass)))

    def _target(self, yi: np.ndarray) -> np.ndarray:
        return yi.astype(np.float32) if len(self.classes_) == 2 or self.multilabel_ else yi

    def _encoded_val(self, validation_data) -> tuple[np.ndarray, np.ndarray] | None:
        Xv, yv = np.asarray(validation_data[0], np.float32), np.asarray(validation_data[1])
        if self.multilabel_:
            return (Xv, yv) if len(yv) else None
        seen = np.isin(yv, self.classes_)  # a class absent from training cannot be scored by this head
        return (Xv[seen], encode_labels(self.classes_, yv[seen])) if seen.any() else None

    def _split_off_val(self, X, yi, w):
        """``validation_fraction`` of the rows, with their weights: early stopping watches the loss it fits."""
        n_val = int(round(len(yi) * float(self.validation_fraction)))
        if n_val < MIN_VAL_ROWS:
            return (X, yi, w), None
        perm = np.random.default_rng(int(self.random_state)).permutation(len(yi))
        vi, ti = perm[:n_val], perm[n_val:]
        return (X[ti], yi[ti], w[ti]), (X[vi], yi[vi], w[vi])

    def _validate_xy(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn's own input validation: finite 2-D float X, 1-D class labels of the same length."""
        from sklearn.utils.multiclass import check_classification_targets, type_of_target
        from sklearn.utils.validation import validate_data

        # a 0/1 matrix of at least two columns; a column vector is single-label, as scikit-learn reads it
        ya = np.asarray(y)
        self.multilabel_ = ya.ndim == 2 and type_of_target(ya) == "multilabel-indicator"
        X, y = validate_data(self, X, y, dtype=np.float32, y_numeric=False, multi_output=self.multilabel_)
        check_classification_targets(y)
        if self.multilabel_:
            self.classes_ = np.arange(y.shape[1])
            return X, y.astype(np.float32)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise FeatcacheValueError("keras head: training data has one class (need at least 2)")
        return X, y

    def fit_stream(self, batches, val_batches=None, *, y_all: np.ndarray) -> KerasHead:
        """Fit from chunk sequences (``len`` + ``[i]`` → (X, raw y), optional ``on_epoch_end``), e.g. HDF5 chunks.

        ``y_all`` is every training label (cheap: labels are always in memory); it fixes ``classes_`` and
        the class weights before the first chunk is read.
        """
        self._check_params()
        y_all = np.asarray(y_all)
        if y_all.ndim == 2:
            raise FeatcacheValueError("keras head: a multi-label head trains in memory only")
        self.multilabel_ = False
        self.classes_ = np.unique(y_all)
        if len(self.classes_) < 2:
            raise FeatcacheValueError("keras head: training data has a single class")
        weights = class_weights(self.classes_, y_all, self.class_weight)
        train = _encoded_dataset(batches, self.classes_, weights, passes=self._passes(len(batches)))
        val = _encoded_dataset(val_batches, self.classes_, None) if val_batches is not None else None
        n_features = int(np.asarray(batches[0][0]).shape[1])  # after any transforms the sequence applies
        self.n_features_in_ = n_features
        self.model_ = self._build(n_features, len(self.classes_))
        history = self.model_.fit(
            train,
            validation_data=val,
            epochs=int(self.epochs),
            callbacks=self._callbacks(val is not None),
            verbose=int(self.verbose),
        )
        self.stream_batches_ = train.served
        return self._finish(history)

    # -- predicting
    def predict_proba(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self, "model_")
        if getattr(X, "shape", (None,))[0] == 0 and getattr(X, "ndim", 0) == 2:  # an empty split: no rows
            return np.zeros((0, len(self.classes_)), np.float32)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), np.float32)
        if len(X) <= EAGER_ROWS:  # one call: tracing a predict function costs more than it saves
            out = np.asarray(self.model_(X, training=False), dtype=np.float64)
        else:
            out = np.asarray(self.model_.predict(X, batch_size=4096, verbose=0), dtype=np.float64)
        if getattr(self, "multilabel_", False):
            return out
        if len(self.classes_) == 2:
            p = 1.0 / (1.0 + np.exp(-out[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        return out / out.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it checks that the head is fitted
        if getattr(self, "multilabel_", False):
            return (proba >= 0.5).astype(np.int64)
        return self.classes_[np.argmax(proba, axis=1)]

    # -- pickling (joblib, clone of a fitted head): the Keras model travels as .keras bytes
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: popping must not touch the live object
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "m.keras")
                model.save(path)
                with open(path, "rb") as f:
                    state["_model_bytes"] = f.read()
        return state

    def __setstate__(self, state):
        data = state.pop("_model_bytes", None)
        super().__setstate__(state)
        if data is not None:
            import keras

            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "m.keras")
                with open(path, "wb") as f:
                    f.write(data)
                self.model_ = keras.saving.load_model(path, safe_mode=True)


def _sample_weight(sample_weight, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n, np.float32)
    w = np.asarray(sample_weight, np.float32)
    if w.ndim == 0:
        return np.full(n, float(w), np.float32)
    if w.shape != (n,):
        raise FeatcacheValueError(f"sample_weight.shape == {w.shape}, expected ({n},)")
    if not np.isfinite(w).all() or (w < 0).any():
        raise FeatcacheValueError("sample_weight must be finite and non-negative")
    if n and not w.any():
        raise FeatcacheValueError("sample_weight is zero everywhere: nothing to fit")
    return w


def _encoded_dataset(batches, classes: np.ndarray, weights: dict[int, float] | None, passes: int = 1):
    """Wrap an (X, raw y) chunk sequence as a ``keras.utils.PyDataset`` yielding (X, class index, weight).

    An epoch of it is ``passes`` passes over the chunks (the sequence reshuffles between epochs).
    """
    import keras

    binary = len(classes) == 2

    class _Encoded(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.served = 0

        def __len__(self):
            return len(batches) * passes

        def __getitem__(self, i):
            X, y = batches[i % len(batches)]
            yi = encode_labels(classes, np.asarray(y))
            self.served += 1
            target = yi.astype(np.float32) if binary else yi
            if weights:
                return np.asarray(X, np.float32), target, np.asarray([weights[j] for j in yi], np.float32)
            return np.asarray(X, np.float32), target

        def on_epoch_end(self):
            if hasattr(batches, "on_epoch_end"):
                batches.on_epoch_end()

    return _Encoded()
