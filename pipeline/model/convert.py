"""scikit-learn heads and transforms as Keras layers, so a stage-2 run becomes one end-to-end model."""

from __future__ import annotations

import keras
import numpy as np

from pipeline.model.layers import ExpandClasses, L2Normalize, PCAProject, ScoresToProba, Standardize
from pipeline.utils.errors import FeatcacheError


class NotConvertible(FeatcacheError):
    """A stage-2 head with no exact Keras equivalent."""


def _not_convertible(what: str) -> NotConvertible:
    return NotConvertible(
        f"{what} cannot be converted into Keras layers, so this run cannot be fine-tuned or exported end to end; "
        "train a linear head (--head logistic | linear_svm | ridge), an MLP (--head mlp) or a Keras head "
        "(--head keras_linear | keras_mlp) instead (predict works with any head)"
    )


def _dense(name: str, W: np.ndarray, b: np.ndarray, activation=None):
    layer = keras.layers.Dense(W.shape[1], activation=activation, name=name)
    layer.build((None, W.shape[0]))
    layer.set_weights([W.astype(np.float32), b.astype(np.float32)])
    return layer


def _linear_scores(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) whose softmax reproduces the estimator: binary 1-row coef → columns [-s/2, s/2]."""
    coef, intercept = np.atleast_2d(np.asarray(coef, np.float64)), np.ravel(np.asarray(intercept, np.float64))
    if coef.shape[0] == 1:
        return np.concatenate([-coef.T / 2, coef.T / 2], axis=1), np.concatenate(
            [-intercept / 2, intercept / 2]
        )
    return coef.T, intercept


def _transform_layers(steps) -> list[keras.layers.Layer]:
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    layers = []
    for i, (name, est) in enumerate(steps):
        lname = f"t{i}_{name.strip('_')}"
        if isinstance(est, StandardScaler):
            d = int(est.n_features_in_)
            layer = Standardize(d, name=lname)
            mean = est.mean_ if est.mean_ is not None else np.zeros(d)
            scale = est.scale_ if est.scale_ is not None else np.ones(d)
            layer.set_weights([np.asarray(mean, np.float32), np.asarray(scale, np.float32)])
        elif isinstance(est, Normalizer) and est.norm == "l2":
            layer = L2Normalize(name=lname)
        elif isinstance(est, (PCA, IncrementalPCA)):
            C = np.asarray(est.components_, np.float64)  # k × d
            k, d = C.shape
            scale = np.ones(k)
            if est.whiten:
                scale = np.sqrt(np.asarray(est.explained_variance_, np.float64))
                scale[scale < np.finfo(scale.dtype).eps] = np.finfo(scale.dtype).eps
            layer = PCAProject(d, k, name=lname)
            offset = np.asarray(est.mean_, np.float64) @ C.T
            layer.set_weights([C.T.astype(np.float32), offset.astype(np.float32), scale.astype(np.float32)])
        else:
            raise _not_convertible(f"feature transform {name!r} ({type(est).__name__})")
        layers.append(layer)
    return layers


def _sklearn_head_layers(est, calibrated: bool) -> list[keras.layers.Layer]:
    from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    from pipeline.heads.zeroshot import ZeroShotClassifier

    if isinstance(est, ZeroShotClassifier):  # zero-shot and few-shot: linear on the L2-normalised embedding
        W, b = est.coef_.T, est.intercept_
        return [
            L2Normalize(name="head_l2"),
            _dense("head_dense", W, b),
            ScoresToProba(est.activation_, name="probabilities"),
        ]
    if isinstance(est, (LogisticRegression, LinearSVC, RidgeClassifier, SGDClassifier)):
        W, b = _linear_scores(est.coef_, est.intercept_)
        ovr = calibrated and W.shape[1] > 2 and isinstance(est, SGDClassifier)  # one-vs-rest log loss
        return [_dense("head_dense", W, b), ScoresToProba("ovr" if ovr else "softmax", name="probabilities")]
    if isinstance(est, MLPClassifier):
        acts = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": None}
        if est.activation not in acts:
            raise _not_convertible(f"MLP activation {est.activation!r}")
        layers = []
        n = len(est.coefs_)
        for i, (W, b) in enumerate(zip(est.coefs_, est.intercepts_, strict=True)):
            if i < n - 1:
                layers.append(_dense(f"head_hidden_{i}", np.asarray(W), np.asarray(b), acts[est.activation]))
            else:
                W2, b2 = _linear_scores(np.asarray(W).T, np.asarray(b))
                layers.append(_dense("head_dense", W2, b2))
        layers.append(ScoresToProba("softmax", name="probabilities"))
        return layers
    raise _not_convertible(f"head {type(est).__name__}")


def _multilabel_head_layers(est) -> list[keras.layers.Layer]:
    """A one-vs-rest linear head: one Dense of the C per-class coefficient rows, sigmoid per class (what
    ``predict_proba`` of each binary logistic regression is, and the sigmoid of each margin
    :func:`pipeline.heads.multilabel.label_scores` reports for ridge and the linear SVM)."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    from pipeline.heads.zeroshot import ZeroShotClassifier

    if isinstance(est, ZeroShotClassifier):  # its own sigmoid per class (activation_)
        return _sklearn_head_layers(est, True)
    linear = (LogisticRegression, LinearSVC, RidgeClassifier, SGDClassifier)
    if not isinstance(est, OneVsRestClassifier) or not all(isinstance(e, linear) for e in est.estimators_):
        raise _not_convertible(f"multi-label head {type(est).__name__}")
    W = np.concatenate([np.atleast_2d(np.asarray(e.coef_, np.float64)) for e in est.estimators_]).T
    b = np.concatenate([np.ravel(np.asarray(e.intercept_, np.float64)) for e in est.estimators_])
    return [_dense("head_dense", W, b, "sigmoid")]


def _keras_head_layers(head, multilabel: bool = False) -> list[keras.layers.Layer]:
    """Copy a KerasHead's layers (config + weights); its output becomes stage 2's probabilities (a
    multi-label head's own final sigmoid as it is)."""
    layers = []
    for layer in head.model_.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        cfg = layer.get_config()
        cfg["name"] = "head_" + cfg["name"]
        clone = layer.__class__.from_config(cfg)
        layers.append((clone, layer))
    out = []
    x = keras.Input(head.model_.inputs[0].shape[1:])
    for clone, orig in layers:
        x = clone(x)
        clone.set_weights(orig.get_weights())
        out.append(clone)
    if multilabel:
        return out
    binary = len(head.classes_) == 2
    out.append(ScoresToProba("binary_logit" if binary else "normalize", name="probabilities"))
    return out


def build_head_model(
    pipeline, n_features: int, n_classes: int, calibrated: bool, multilabel: bool = False
) -> keras.Model:
    """features (N×D, as cached) → probabilities over the cache's classes, from a fitted sklearn Pipeline
    (``multilabel``: one sigmoid probability per class, not a softmax over them)."""
    from pipeline.heads.keras_head import KerasHead

    est = pipeline.steps[-1][1]
    transforms = _transform_layers(pipeline.steps[:-1])
    if isinstance(est, KerasHead):
        head = _keras_head_layers(est, multilabel)
    else:
        head = _multilabel_head_layers(est) if multilabel else _sklearn_head_layers(est, calibrated)
    columns = list(range(n_classes)) if multilabel else np.asarray(est.classes_).astype(int).tolist()
    inp = keras.Input((n_features,), name="features")
    x = inp
    for layer in transforms + head:
        x = layer(x)
    if columns != list(range(n_classes)):
        x = ExpandClasses(columns, n_classes, name="expand_classes")(x)
    return keras.Model(inp, x, name="head")


def stage2_scores(
    pipeline, X: np.ndarray, n_classes: int, multilabel: bool = False
) -> tuple[np.ndarray, bool]:
    """Exactly what stage 2 reports for feature rows ``X``: (N × n_classes probabilities, calibrated);
    a multi-label run's per-class scores (:func:`pipeline.heads.multilabel.label_scores`)."""
    from pipeline.heads.fitting import decision_scores

    if multilabel:
        from pipeline.heads.multilabel import label_scores

        return label_scores(pipeline, X)

    p, calibrated = decision_scores(pipeline, X)
    full = np.zeros((len(X), n_classes), np.float64)
    full[:, np.asarray(pipeline.steps[-1][1].classes_).astype(int)] = p
    return full, calibrated
