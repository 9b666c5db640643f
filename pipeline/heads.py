"""Heads and feature transforms: everything a run fits on top of the cached features.

A head is a scikit-learn estimator, built from a registry by name (``logistic``, ``knn``, ``keras_mlp``,
...), so every head fits in one :class:`~sklearn.pipeline.Pipeline` with its transforms and takes part in a
search the same way. Heads that can learn from chunks (``partial_fit`` or a Keras generator) also have a
streaming variant, used when the cache does not fit in memory. Nothing heavy is imported at module level:
TensorFlow is only imported when a Keras head is fitted or loaded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from .errors import FeatcacheError

# ------------------------------------------------------------------------------------------ transforms

TRANSFORMS = ("standardize", "l2", "pca:K")


@dataclass(frozen=True)
class TransformSpec:
    """One parsed entry of ``train.transforms``: ``standardize``, ``l2`` or ``pca:K`` (K int, or a float in (0, 1))."""

    kind: str
    arg: float | int | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def parse_transforms(specs: Sequence[str]) -> list[TransformSpec]:
    """Validate transform names early, so a typo fails before any data is read."""
    out: list[TransformSpec] = []
    for raw in specs:
        s = str(raw).strip().lower()
        if s in ("", "none"):
            continue
        kind, _, arg = s.partition(":")
        if kind in ("standardize", "l2") and not arg:
            out.append(TransformSpec(kind))
        elif kind == "pca":
            try:
                value: float | int = float(arg) if "." in arg else int(arg)
            except ValueError:
                raise FeatcacheError(
                    f"transform {raw!r}: expected pca:K with K an integer or a fraction in (0, 1)"
                ) from None
            if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value < 1):
                raise FeatcacheError(
                    f"transform {raw!r}: K must be >= 1 components or a variance fraction in (0, 1)"
                )
            out.append(TransformSpec("pca", value))
        else:
            raise FeatcacheError(f"unknown transform {raw!r} (known: {', '.join(TRANSFORMS)})")
    return out


def build_transforms(
    specs: Sequence[str],
    *,
    streaming: bool = False,
    n_samples: int | None = None,
    n_features: int | None = None,
    seed: int = 0,
) -> list[tuple[str, Any]]:
    """Pipeline steps for ``specs``. Streaming uses estimators that learn from chunks (IncrementalPCA)."""
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps: list[tuple[str, Any]] = []
    for t in parse_transforms(specs):
        name = str(t.kind)
        while name in {n for n, _ in steps}:
            name += "_"
        if t.kind == "standardize":
            steps.append((name, StandardScaler()))
        elif t.kind == "l2":
            steps.append((name, Normalizer(norm="l2")))
        else:
            k = t.arg
            if isinstance(k, float):
                if streaming:
                    raise FeatcacheError(
                        f"transform {t}: a variance fraction needs the whole matrix; use pca:K when streaming"
                    )
                steps.append((name, PCA(n_components=k, svd_solver="full", random_state=seed)))
                continue
            # never more components than rows or columns
            limit = min(x for x in (n_samples, n_features, k) if x)
            pca = (
                IncrementalPCA(n_components=limit)
                if streaming
                else PCA(n_components=limit, random_state=seed)
            )
            steps.append((name, pca))
    return steps


def describe_transforms(steps: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """What stage 3 needs to rebuild the chain without the cache: class and effective parameters."""
    out = []
    for name, est in steps:
        params = {
            k: v
            for k, v in est.get_params(deep=False).items()
            if isinstance(v, (int, float, str, bool, type(None)))
        }
        out.append({"step": name, "class": type(est).__name__, "params": params})
    return out


# ------------------------------------------------------------------------------------------ keras head


def _encode(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(classes, y)
    idx = np.clip(idx, 0, len(classes) - 1)
    if not np.array_equal(classes[idx], y):
        raise FeatcacheError("labels outside the classes the head was fitted on")
    return idx


def class_weights(classes: np.ndarray, y: np.ndarray, spec: Any) -> dict[int, float] | None:
    """``None`` | ``"balanced"`` | {label: weight} → weight per *class position*, as Keras and our chunks use."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise FeatcacheError(f"class_weight must be 'balanced', a mapping or none, got {spec!r}")
        counts = np.array([(y == c).sum() for c in classes], dtype=np.float64)
        return {i: float(len(y) / (len(classes) * max(c, 1.0))) for i, c in enumerate(counts)}
    if isinstance(spec, dict):
        lookup = {str(k): float(v) for k, v in spec.items()}
        return {i: lookup.get(str(c), 1.0) for i, c in enumerate(classes)}
    raise FeatcacheError(f"class_weight must be 'balanced', a mapping or none, got {spec!r}")


class KerasHead(ClassifierMixin, BaseEstimator):
    """A small Keras classifier with the scikit-learn estimator API (fit/predict/predict_proba, clone-able).

    ``hidden=()`` is ``Dense(n, softmax)`` (``Dropout`` + ``Dense(1)`` logit when binary); ``hidden=(256,)``
    adds ``Dense(256, relu)`` layers. ``dropout=None`` means 0.2 for binary and 0 otherwise. Early stopping
    watches ``validation_data`` when given (the cache's val split), else ``validation_fraction`` of the
    training rows, so it never needs the test split.
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
        self.class_weight = class_weight
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.verbose = verbose

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
            "validation_fraction": 0.0 <= float(self.validation_fraction) < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise FeatcacheError(f"keras head: invalid {name}={getattr(self, name)!r}")

    def _build(self, n_features: int, n_classes: int):
        import keras

        keras.utils.set_random_seed(int(self.random_state))
        reg = keras.regularizers.L2(float(self.l2)) if self.l2 else None
        binary = n_classes == 2
        inputs = keras.Input((n_features,), name="features")
        x = inputs
        for i, units in enumerate(self.hidden):
            x = keras.layers.Dense(int(units), activation="relu", kernel_regularizer=reg, name=f"hidden_{i}")(
                x
            )
        rate = (0.2 if binary else 0.0) if self.dropout is None else float(self.dropout)
        if rate > 0:
            x = keras.layers.Dropout(rate, name="dropout")(x)
        if binary:
            out = keras.layers.Dense(1, kernel_regularizer=reg, name="logit")(x)
            loss = keras.losses.BinaryCrossentropy(from_logits=True)
            metric = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
        else:
            out = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg, name="probs")(x)
            loss = keras.losses.SparseCategoricalCrossentropy()
            metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        model = keras.Model(inputs, out, name="head")
        model.compile(optimizer=keras.optimizers.Adam(float(self.learning_rate)), loss=loss, metrics=[metric])
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
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise FeatcacheError("keras head: training data has a single class")
        self.n_features_in_ = X.shape[1]
        yi = _encode(self.classes_, y)
        weights = class_weights(self.classes_, y, self.class_weight)
        w = np.ones(len(y), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        if weights:
            w = w * np.asarray([weights[i] for i in yi], np.float32)
        val = None
        if validation_data is not None:
            Xv, yv = np.asarray(validation_data[0], np.float32), np.asarray(validation_data[1])
            seen = np.isin(yv, self.classes_)  # a class absent from training cannot be scored by this head
            val = (Xv[seen], _encode(self.classes_, yv[seen])) if seen.any() else None
        elif self.validation_fraction > 0 and len(y) >= 20:
            rng = np.random.default_rng(int(self.random_state))
            perm = rng.permutation(len(y))
            n_val = max(1, int(round(len(y) * float(self.validation_fraction))))
            vi, ti = perm[:n_val], perm[n_val:]
            val = (X[vi], yi[vi])
            X, yi, w = X[ti], yi[ti], w[ti]
        self.model_ = self._build(X.shape[1], len(self.classes_))
        history = self.model_.fit(
            X,
            yi.astype(np.float32) if len(self.classes_) == 2 else yi,
            sample_weight=w,
            validation_data=None
            if val is None
            else (val[0], val[1].astype(np.float32) if len(self.classes_) == 2 else val[1]),
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            shuffle=True,
            callbacks=self._callbacks(val is not None),
            verbose=int(self.verbose),
        )
        return self._finish(history)

    def fit_stream(self, batches, val_batches=None, *, y_all: np.ndarray) -> KerasHead:
        """Fit from chunk sequences (``len`` + ``[i]`` → (X, raw y), optional ``on_epoch_end``), e.g. HDF5 chunks.

        ``y_all`` is every training label (cheap: labels are always in memory); it fixes ``classes_`` and
        the class weights before the first chunk is read.
        """
        self._check_params()
        y_all = np.asarray(y_all)
        self.classes_ = np.unique(y_all)
        if len(self.classes_) < 2:
            raise FeatcacheError("keras head: training data has a single class")
        weights = class_weights(self.classes_, y_all, self.class_weight)
        train = _encoded_dataset(batches, self.classes_, weights)
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
        X = np.asarray(X, dtype=np.float32)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), np.float32)
        out = np.asarray(self.model_.predict(X, batch_size=4096, verbose=0), dtype=np.float64)
        if len(self.classes_) == 2:
            p = 1.0 / (1.0 + np.exp(-out[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        return out / out.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

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


def _encoded_dataset(batches, classes: np.ndarray, weights: dict[int, float] | None):
    """Wrap an (X, raw y) chunk sequence as a ``keras.utils.PyDataset`` yielding (X, class index, weight)."""
    import keras

    binary = len(classes) == 2

    class _Encoded(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.served = 0

        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            X, y = batches[i]
            yi = _encode(classes, np.asarray(y))
            self.served += 1
            target = yi.astype(np.float32) if binary else yi
            if weights:
                return np.asarray(X, np.float32), target, np.asarray([weights[j] for j in yi], np.float32)
            return np.asarray(X, np.float32), target

        def on_epoch_end(self):
            if hasattr(batches, "on_epoch_end"):
                batches.on_epoch_end()

    return _Encoded()


# ------------------------------------------------------------------------------------------ registry


@dataclass
class Head:
    """A head made for one fit: the estimator plus how the fitting loop must drive it."""

    name: str
    kind: str  # "sklearn" | "keras"
    estimator: Any
    streaming: bool = False
    epochs: int = 1  # passes of partial_fit over the chunks (streaming scikit-learn heads)
    ignored: list[str] = field(default_factory=list)  # params that do not apply in this mode
    # how the val split reaches ``fit`` (Keras: validation_data; HistGradientBoosting: X_val, y_val)
    val_kwargs: Callable[[np.ndarray, np.ndarray], dict[str, Any]] | None = None
    class_weight: Any = None  # applied by the fitting loop as sample weights (partial_fit heads, mlp)
    auto_step: bool = False  # SGD step size to be set from the data's scale (see ``sgd_step``)


@dataclass(frozen=True)
class HeadSpec:
    name: str
    kind: str
    doc: str
    build: Callable[[dict[str, Any], int], Any]
    build_stream: Callable[[dict[str, Any], int, int], Any] | None = None  # (params, seed, n_train)
    stream_only: frozenset[str] = frozenset()  # e.g. ``epochs`` of a partial_fit head
    memory_only: frozenset[str] = frozenset()
    aliases: tuple[tuple[str, str], ...] = ()  # (short name, estimator parameter)
    stream_epochs: int = 20


def _set(est, params: dict[str, Any], head: str):
    try:
        return est.set_params(**params)
    except ValueError:
        known = sorted(est.get_params(deep=False))
        bad = [k for k in params if k not in known]
        raise FeatcacheError(
            f"head {head!r}: unknown parameter {', '.join(map(repr, bad))} (known: {', '.join(known)})"
        ) from None


def _logistic(p, seed):
    from sklearn.linear_model import LogisticRegression

    return _set(LogisticRegression(max_iter=1000, random_state=seed), p, "logistic")


def _sgd(loss: str, head: str):
    def build(p, seed, n_train):
        """C maps to SGD's alpha = 1 / (C · n): the same objective as the in-memory solver, per sample."""
        from sklearn.linear_model import SGDClassifier

        p = dict(p)
        try:
            c = float(p.pop("C", 1.0))
        except (TypeError, ValueError):
            raise FeatcacheError(f"head {head!r}: C must be a number") from None
        if c <= 0:
            raise FeatcacheError(f"head {head!r}: C must be > 0, got {c}")
        est = SGDClassifier(
            loss=loss, alpha=1.0 / (c * max(n_train, 1)), learning_rate="constant", random_state=seed
        )
        return _set(est, p, head)

    return build


def _linear_svm(p, seed):
    from sklearn.svm import LinearSVC

    return _set(LinearSVC(random_state=seed), p, "linear_svm")


def _ridge(p, seed):
    from sklearn.linear_model import RidgeClassifier

    return _set(RidgeClassifier(), p, "ridge")


def _knn(p, seed):
    from sklearn.neighbors import KNeighborsClassifier

    return _set(KNeighborsClassifier(n_neighbors=5), p, "knn")


def _mlp(early_stopping: bool):
    def build(p, seed, n_train=None):
        from sklearn.neural_network import MLPClassifier

        p = dict(p)
        if "hidden_layer_sizes" in p:
            h = p["hidden_layer_sizes"]
            p["hidden_layer_sizes"] = tuple(int(v) for v in (h if isinstance(h, (list, tuple)) else [h]))
        est = MLPClassifier(
            hidden_layer_sizes=(256,), early_stopping=early_stopping, max_iter=200, random_state=seed
        )
        return _set(est, p, "mlp")

    return build


def _hgb(p, seed):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return _set(
        HistGradientBoostingClassifier(max_iter=100, early_stopping=True, random_state=seed), p, "hgb"
    )


def _keras(hidden: tuple[int, ...], head: str):
    def build(p, seed, n_train=None):
        p = dict(p)
        if "hidden" in p:
            h = p["hidden"]
            p["hidden"] = tuple(int(v) for v in (h if isinstance(h, (list, tuple)) else [h]))
        return _set(KerasHead(hidden=hidden, random_state=seed), p, head)

    return build


HEADS: dict[str, HeadSpec] = {
    s.name: s
    for s in (
        HeadSpec("logistic", "sklearn", "multinomial logistic regression (lbfgs); streams as SGD log-loss", _logistic,
                 _sgd("log_loss", "logistic"), stream_only=frozenset({"epochs"}), memory_only=frozenset({"max_iter", "solver", "tol"})),
        HeadSpec("linear_svm", "sklearn", "linear SVM (liblinear); streams as SGD hinge", _linear_svm,
                 _sgd("hinge", "linear_svm"), stream_only=frozenset({"epochs"}), memory_only=frozenset({"max_iter", "dual", "tol"})),
        HeadSpec("ridge", "sklearn", "ridge classifier (closed form)", _ridge),
        HeadSpec("knn", "sklearn", "k-nearest neighbours", _knn, aliases=(("k", "n_neighbors"),)),
        HeadSpec("mlp", "sklearn", "scikit-learn MLP, hidden=[256]; streams with partial_fit", _mlp(True), _mlp(False),
                 stream_only=frozenset({"epochs"}), memory_only=frozenset({"early_stopping", "max_iter"}),
                 aliases=(("hidden", "hidden_layer_sizes"),)),
        HeadSpec("hgb", "sklearn", "histogram gradient boosting, early stopping on the val split", _hgb),
        HeadSpec("keras_linear", "keras", "Keras Dense(n, softmax); Dropout(0.2) + Dense(1) logit if binary", _keras((), "keras_linear"),
                 _keras((), "keras_linear")),
        HeadSpec("keras_mlp", "keras", "Keras Dense(256, relu) + Dense(n, softmax); hidden configurable", _keras((256,), "keras_mlp"),
                 _keras((256,), "keras_mlp")),
    )
}  # fmt: skip


def get_head_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise FeatcacheError(f"unknown head {name!r} (known: {', '.join(HEADS)})")
    return HEADS[name]


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: the string ``"none"`` stands for ``None``; lists stay lists."""
    return {k: (None if isinstance(v, str) and v.lower() == "none" else v) for k, v in params.items()}


def can_stream(name: str) -> bool:
    return get_head_spec(name).build_stream is not None


def make_head(
    name: str,
    params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    streaming: bool = False,
    n_train: int = 0,
) -> Head:
    """Build head ``name`` with ``params``; unknown heads and parameters raise :class:`FeatcacheError`."""
    spec = get_head_spec(name)
    p = _clean(dict(params or {}))
    for short, full in spec.aliases:
        if short in p:
            p[full] = p.pop(short)
    drop = spec.memory_only if streaming else spec.stream_only
    ignored = sorted(k for k in p if k in drop)
    p = {k: v for k, v in p.items() if k not in drop}
    epochs = 1
    cw_given, cw = "class_weight" in p, p.pop("class_weight", None)
    if streaming:
        if spec.build_stream is None:
            streamable = ", ".join(n for n, s in HEADS.items() if s.build_stream is not None)
            raise FeatcacheError(
                f"head {name!r} cannot learn from chunks; streaming works with: {streamable}"
            )
        if spec.kind == "sklearn":
            epochs = int(p.pop("epochs", spec.stream_epochs))
            if epochs < 1:
                raise FeatcacheError(f"head {name!r}: epochs must be >= 1, got {epochs}")
        est = spec.build_stream(p, seed, n_train)
    else:
        est = spec.build(p, seed)
    if cw_given:
        cw = _place_class_weight(name, est, cw, native=spec.kind == "keras" or not streaming)
    auto_step = streaming and name in ("logistic", "linear_svm") and not {"learning_rate", "eta0"} & set(p)
    val_kwargs = None
    if spec.kind == "keras":
        val_kwargs = _keras_val
    elif name == "hgb" and est.get_params().get("early_stopping") is True:
        val_kwargs = _hgb_val
    return Head(name, spec.kind, est, streaming, epochs, ignored, val_kwargs, cw, auto_step)


def _place_class_weight(name: str, est, cw, native: bool):
    """The estimator's own ``class_weight`` when it has one, else sample weights applied by the fitting loop."""
    import inspect

    if native and "class_weight" in est.get_params(deep=False):
        _set(est, {"class_weight": cw}, name)
        return None
    fit = getattr(est, "partial_fit", None) or est.fit
    if "sample_weight" not in inspect.signature(fit).parameters:
        raise FeatcacheError(
            f"head {name!r}: unknown parameter 'class_weight' (this head cannot weight samples)"
        )
    return cw


def sgd_step(X: np.ndarray) -> float:
    """A constant SGD step of 0.5 / mean ||x||²: stable whatever the feature scale (standardized or unit)."""
    ms = float(np.mean(np.sum(np.asarray(X, np.float64) ** 2, axis=1))) if len(X) else 1.0
    return 0.5 / max(ms, 1e-12)


def _keras_val(Xv: np.ndarray, yv: np.ndarray) -> dict[str, Any]:
    return {"validation_data": (Xv, yv)}


def _hgb_val(Xv: np.ndarray, yv: np.ndarray) -> dict[str, Any]:
    return {"X_val": Xv, "y_val": yv}


def head_is_keras(estimator: Any) -> bool:
    return isinstance(estimator, KerasHead)
