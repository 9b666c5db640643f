"""Heads and feature transforms: everything a run fits on top of the cached features.

A head is a scikit-learn estimator, built from a registry by name (``logistic``, ``knn``, ``keras_mlp``,
...), so every head fits in one :class:`~sklearn.pipeline.Pipeline` with its transforms and takes part in a
search the same way. Heads that can learn from chunks (``partial_fit`` or a Keras generator) also have a
streaming variant, used when the cache does not fit in memory. Nothing heavy is imported at module level:
TensorFlow is only imported when a Keras head is fitted or loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.heads.keras_head import KerasHead
from pipeline.utils.config import HEAD_NAMES
from pipeline.utils.errors import FeatcacheError


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
    full_batch: bool = False  # streams with ``fit_chunks``: every pass over the chunks one loss and gradient


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
    full_batch: bool = False  # the same solver in memory and streamed (``fit_chunks``): no epochs, no SGD


def _set(est, params: dict[str, Any], head: str):
    try:
        return est.set_params(**params)
    except ValueError:
        known = sorted(est.get_params(deep=False))
        bad = [k for k in params if k not in known]
        raise FeatcacheError(
            f"head {head!r}: unknown parameter {', '.join(map(repr, bad))} (known: {', '.join(known)})"
        ) from None


def _logistic(p, seed, n_train=None):
    """Float32-BLAS L-BFGS on scikit-learn's objective (:mod:`pipeline.heads.logistic`), in memory or
    streamed; 1000 iterations are a cap, not the rule: it stops when the objective stops moving."""
    from pipeline.heads.logistic import BlasLogisticRegression

    return _set(BlasLogisticRegression(max_iter=1000, random_state=seed), p, "logistic")


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


def _text(head: str):
    def build(p, seed, n_train=None):
        """The estimator of a text head; its text embeddings are set by :func:`pipeline.heads.zeroshot.text_weights`."""
        from pipeline.heads import zeroshot

        if head == "zeroshot":
            return _set(zeroshot.ZeroShotClassifier(), p, head)
        return _set(zeroshot.FewShotClassifier(random_state=seed), p, head)

    return build


HEADS: dict[str, HeadSpec] = {
    s.name: s
    for s in (
        HeadSpec("logistic", "sklearn", "multinomial logistic regression (float32 L-BFGS); streams the same full-batch fit", _logistic,
                 _logistic, stream_only=frozenset({"epochs"}), full_batch=True),
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
        HeadSpec("zeroshot", "sklearn", "CLIP/SigLIP zero-shot from the class names (no fitting; --pooling pooled)", _text("zeroshot")),
        HeadSpec("fewshot", "sklearn", "zero-shot and logistic logits mixed, the mix chosen on val (--pooling pooled)", _text("fewshot")),
    )
}  # fmt: skip
if tuple(HEADS) != HEAD_NAMES:  # the names live in utils.config, so train.head is checked before any import
    raise ImportError(
        f"heads.registry: the heads {tuple(HEADS)} must be utils.config.HEAD_NAMES {HEAD_NAMES}"
    )


#: heads with no exact Keras equivalent: their runs predict, but cannot be fine-tuned or exported
NOT_CONVERTIBLE = frozenset({"knn", "hgb"})


def convertible_head(name: str) -> bool:
    """Whether ``finetune``/``export`` can turn a run of this head into Keras layers."""
    return name not in NOT_CONVERTIBLE


def get_head_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise FeatcacheError(f"unknown head {name!r} (known: {', '.join(HEADS)})")
    return HEADS[name]


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: the string ``"none"`` stands for ``None``; lists stay lists."""
    return {k: (None if isinstance(v, str) and v.lower() == "none" else v) for k, v in params.items()}


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
    drop = spec.memory_only if streaming and not spec.full_batch else spec.stream_only
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
        if spec.kind == "sklearn" and not spec.full_batch:
            epochs = int(p.pop("epochs", spec.stream_epochs))
            if epochs < 1:
                raise FeatcacheError(f"head {name!r}: epochs must be >= 1, got {epochs}")
        est = spec.build_stream(p, seed, n_train)
    else:
        est = spec.build(p, seed)
    if cw_given:
        cw = _place_class_weight(
            name, est, cw, native=spec.kind == "keras" or spec.full_batch or not streaming
        )
    auto_step = streaming and name == "linear_svm" and not {"learning_rate", "eta0"} & set(p)
    val_kwargs = None
    if spec.kind == "keras":
        val_kwargs = _keras_val
    elif (name == "hgb" and est.get_params().get("early_stopping") is True) or name == "fewshot":
        val_kwargs = _xy_val
    return Head(name, spec.kind, est, streaming, epochs, ignored, val_kwargs, cw, auto_step, spec.full_batch)


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


def _xy_val(Xv: np.ndarray, yv: np.ndarray) -> dict[str, Any]:
    return {"X_val": Xv, "y_val": yv}


#: a search's last tie-break, simplest family first: linear heads (one weight per feature and class), then
#: k-NN (no fitted weights, but every training row kept), then the networks, then boosted trees
SIMPLICITY = {"ridge": 0, "logistic": 0, "linear_svm": 0, "keras_linear": 0, "zeroshot": 0, "fewshot": 0, "knn": 1, "mlp": 2, "keras_mlp": 2, "hgb": 3}  # fmt: skip


def model_complexity(name: str, params: dict[str, Any], transforms) -> tuple[float, ...]:
    """How complex a configuration is (smaller: simpler), compared in order: the head's family
    (:data:`SIMPLICITY`), its hidden units (networks), the features it sees (a ``pca:K`` chain: K, else all),
    then its regularization (smaller ``C``, larger ``alpha``, more neighbours: simpler)."""
    p = {short: params[full] for short, full in get_head_spec(name).aliases if full in params} | params
    hidden = p.get("hidden", (256,) if name in ("mlp", "keras_mlp") else ())
    units = sum(int(h) for h in (hidden if isinstance(hidden, (list, tuple)) else [hidden]))
    widths = [float(t.split(":", 1)[1]) for t in transforms if str(t).startswith("pca:")]
    inputs = min((w for w in widths if w >= 1), default=float("inf"))
    try:
        if "C" in p:
            reg = float(p["C"])
        elif "alpha" in p:
            reg = -float(p["alpha"])
        else:
            reg = -float(p.get("n_neighbors", p.get("k", 5 if name == "knn" else 0)))
    except (TypeError, ValueError):
        reg = 0.0
    return (SIMPLICITY.get(name, len(SIMPLICITY)), units, inputs, reg)
