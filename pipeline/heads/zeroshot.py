"""Heads that start from the words: zero-shot classification from class names, and a few-shot head that
mixes it with a logistic regression fitted on the labelled rows.

Both are linear heads on the L2-normalised joint-space image embedding (a CLIP or SigLIP cache extracted
with ``--pooling pooled``): ``probabilities = activation(x̂ · Wᵀ + b)``. The zero-shot weights are the
class embeddings of the text tower (:mod:`pipeline.features.text`) — each class's prompts (its words in
every template) embedded, normalised, averaged and normalised again as in the CLIP paper — times
``exp(logit_scale)``; the bias is SigLIP's ``logit_bias`` (0 for CLIP); the activation is the model's own
(CLIP: softmax over the classes; SigLIP: a sigmoid per class). The estimators hold only numpy arrays, so a
run saves through skops and converts into Keras layers like any linear head.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.utils.config import TEMPLATE_SETS, Config
from pipeline.utils.errors import FeatcacheError

#: CLIP's 80 prompt templates for ImageNet (Radford et al. 2021, the "Prompt_Engineering_for_ImageNet"
#: notebook of openai/CLIP)
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

#: the built-in sets ``zeroshot.templates`` may name
BUILTIN_TEMPLATES = {"imagenet": IMAGENET_TEMPLATES, "photo": ("a photo of a {}.",)}
assert tuple(BUILTIN_TEMPLATES) == TEMPLATE_SETS


def expand_templates(templates: list[str]) -> list[str]:
    """The templates to render: built-in set names expanded, duplicates dropped, order kept."""
    out: list[str] = []
    for t in templates:
        out += BUILTIN_TEMPLATES.get(t, (t,))
    return list(dict.fromkeys(out))


def class_words(name: str, prompts: dict[str, Any]) -> str:
    """The words a class stands for: ``zeroshot.prompts[name]``, else its name with ``_`` as spaces."""
    words = str(prompts.get(name, name.replace("_", " "))).strip()
    if not words:
        raise FeatcacheError(
            f"zeroshot: class {name!r} renders to an empty prompt; give its words: [zeroshot] prompts = "
            f'{{ {name or "NAME"} = "..." }}'
        )
    return words


def class_prompts(class_names: list[str], templates: list[str], prompts: dict[str, Any]) -> list[list[str]]:
    """Each class's prompts: its words in every template (``zeroshot.prompts`` keys must be class names)."""
    unknown = sorted(set(prompts) - set(class_names))
    if unknown:
        raise FeatcacheError(
            f"zeroshot.prompts: {', '.join(map(repr, unknown[:5]))} is not a class of this cache "
            f"(classes: {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})"
        )
    for t in templates:
        if t.count("{}") != 1:
            raise FeatcacheError(f"zeroshot.templates: {t!r} must hold exactly one {{}} (the class words)")
    rendered = []
    for name in class_names:
        words = class_words(name, prompts)
        rendered.append([t.replace("{}", words) for t in templates])
    return rendered


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero): ``sklearn.preprocessing.Normalizer``'s rule."""
    X = np.asarray(X, np.float64)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(n == 0, 1.0, n)


def class_embeddings(prompt_embeddings: np.ndarray, per_class: int) -> np.ndarray:
    """C × D: each class's prompt embeddings normalised, averaged, normalised again (the CLIP ensemble)."""
    E = normalize_rows(prompt_embeddings).reshape(-1, per_class, prompt_embeddings.shape[1])
    return normalize_rows(E.mean(axis=1))


def _activate(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid_offsets(Z: np.ndarray, Y: np.ndarray, steps: int = 50) -> np.ndarray:
    """Per column c, the ``b_c`` that maximises the likelihood of ``Y[:, c]`` under ``sigmoid(Z[:, c] + b_c)``
    (Newton's method on a convex 1-D problem; a column all 0 or all 1 stays at the start, its base rate)."""
    Z, Y = np.asarray(Z, np.float64), np.asarray(Y, np.float64)
    rate = np.clip(Y.mean(axis=0), 1e-3, 1 - 1e-3)
    b = np.log(rate / (1 - rate)) - Z.mean(axis=0)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(Z + b)))
        grad, hess = (p - Y).sum(axis=0), (p * (1 - p)).sum(axis=0)
        b -= np.clip(grad / np.maximum(hess, 1e-9), -5.0, 5.0)
    return b


class ZeroShotClassifier(ClassifierMixin, BaseEstimator):
    """``activation(exp(logit_scale) · cos(x, t_c) + logit_bias)`` over the classes: no fitting.

    ``text_embeddings`` (C × D, one row per class index of the cache) come from the text tower; ``fit`` only
    checks the width and lays out ``coef_``/``intercept_``, the linear head every converter reads."""

    def __init__(self, text_embeddings=None, logit_scale=0.0, logit_bias=0.0, activation="softmax"):
        self.text_embeddings = text_embeddings
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.activation = activation

    def _zero_shot(self, n_features: int) -> tuple[np.ndarray, np.ndarray]:
        if self.text_embeddings is None:
            raise FeatcacheError(
                "a text head needs the class embeddings of a text tower (train --head zeroshot)"
            )
        T = normalize_rows(self.text_embeddings)
        if T.shape[1] != n_features:
            raise FeatcacheError(
                f"zeroshot: the text embeddings have {T.shape[1]} dimensions, the image embedding {n_features}:"
                " not the same joint space"
            )
        if self.activation not in ("softmax", "sigmoid"):
            raise FeatcacheError(f"zeroshot: activation must be softmax or sigmoid, got {self.activation!r}")
        return np.exp(float(self.logit_scale)) * T, np.full(len(T), float(self.logit_bias))

    def fit(self, X, y=None, **_):
        """No fitting, except on a multi-label cache (``y`` N×C multi-hot), where each class is scored alone:
        SigLIP's sigmoids as they are; CLIP's softmax is a share over the classes, so there each class gets
        ``sigmoid(exp(logit_scale) · cos + b_c)``, ``b_c`` the maximum-likelihood offset on the rows given
        (the slope stays the model's)."""
        self.coef_, self.intercept_ = self._zero_shot(np.asarray(X).shape[1])
        self.classes_ = np.arange(len(self.coef_))
        self.n_features_in_ = int(np.asarray(X).shape[1])
        self.activation_ = self.activation
        if y is not None and np.ndim(y) == 2:
            self.activation_ = "sigmoid"
            if self.activation == "softmax":
                self.intercept_ = sigmoid_offsets(normalize_rows(X) @ self.coef_.T, np.asarray(y))
        return self

    def decision_function(self, X) -> np.ndarray:
        return normalize_rows(X) @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return _activate(self.decision_function(X), self.activation_)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


class FewShotClassifier(ZeroShotClassifier):
    """The zero-shot logits and a logistic regression's (fitted on the standardised x̂ of the train rows)
    mixed: ``mix · zero-shot + (1 - mix) · logistic``, one linear head on x̂, softmax over the classes.

    ``mix`` None chooses it on the val split from ``mixes`` evenly spaced values in [0, 1] (endpoints
    included, so on val it is never less accurate than the better of the two; ties go to the lower val
    log loss); without val rows it is 0.5."""

    def __init__(
        self, text_embeddings=None, logit_scale=0.0, logit_bias=0.0, activation="softmax", C=1.0, mix=None,
        mixes=11, random_state=0,
    ):  # fmt: skip
        super().__init__(text_embeddings, logit_scale, logit_bias, activation)
        self.C, self.mix, self.mixes, self.random_state = C, mix, mixes, random_state

    def fit(self, X, y, X_val=None, y_val=None):
        from sklearn.linear_model import LogisticRegression

        Xn = normalize_rows(X)
        zs_w, zs_b = self._zero_shot(Xn.shape[1])
        mu, sd = Xn.mean(axis=0), Xn.std(axis=0)
        sd = np.where(sd < 1e-12, 1.0, sd)
        lr = LogisticRegression(C=float(self.C), max_iter=1000, random_state=self.random_state)
        lr.fit((Xn - mu) / sd, y)
        W = np.zeros_like(zs_w)
        b = np.full(len(zs_w), -30.0)  # a class absent from train: the logistic half never picks it
        coef, inter = np.atleast_2d(lr.coef_), np.ravel(lr.intercept_)
        if coef.shape[0] == 1:  # binary: the softmax of [-s/2, s/2] is the sigmoid of s
            coef, inter = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-inter / 2, inter / 2])
        cls = np.asarray(lr.classes_).astype(int)
        W[cls], b[cls] = coef / sd, inter - (coef / sd) @ mu  # undo the standardisation: linear in x̂
        self.classes_ = np.arange(len(zs_w))
        self.n_features_in_ = int(Xn.shape[1])
        self.activation_ = "softmax"
        self.mix_, self.val_accuracy_ = self._choose(zs_w, zs_b, W, b, X_val, y_val)
        m = self.mix_
        self.coef_, self.intercept_ = m * zs_w + (1 - m) * W, m * zs_b + (1 - m) * b
        return self

    def _choose(self, zs_w, zs_b, W, b, X_val, y_val) -> tuple[float, dict[str, float]]:
        if self.mix is not None:
            return float(self.mix), {}
        if X_val is None or not len(X_val):
            return 0.5, {}
        Xv, yv = normalize_rows(X_val), np.asarray(y_val).astype(int)
        best, scores = (-1.0, 0.0, 0.5), {}
        for m in np.linspace(0.0, 1.0, int(self.mixes)):
            z = Xv @ (m * zs_w + (1 - m) * W).T + (m * zs_b + (1 - m) * b)
            acc = float(np.mean(np.argmax(z, axis=1) == yv))
            p = _activate(z, "softmax")[np.arange(len(yv)), yv]
            nll = float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))
            scores[f"{m:.2f}"] = acc
            if (acc, -nll) > best[:2]:
                best = (acc, -nll, float(m))
        return best[2], scores


def check_joint_space(meta: dict[str, Any], what: str) -> None:
    """The cache must hold the model's own joint-space image embedding (``--pooling pooled``); ``what``
    names the option that needs it (``--head zeroshot``, ``--text``)."""
    if meta.get("pooling") != "pooled" or list(meta.get("layers") or []) != ["output"]:
        raise FeatcacheError(
            f"{what}: the cache holds {meta.get('pooling')} features of layer(s) "
            f"{', '.join(meta.get('layers') or [])}, not the joint image-text space; extract the CLIP or SigLIP "
            "backbone with --pooling pooled (its default) and no --layer"
        )


def cache_text_tower(meta: dict[str, Any]):
    """The text tower of the backbone a cache was extracted with (its preset folder or handle)."""
    from pipeline.features.text import text_tower

    backbone = (meta.get("config") or {}).get("backbone") or {}
    name = str(backbone.get("name") or meta.get("backbone"))
    return text_tower(name, str(meta.get("weights")), meta.get("weights_digest"))


def text_weights(cfg: Config, cache, head: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The zero-shot parameters of a cache's classes (text embeddings, logit scale and bias, activation)
    and what the run records about them: the templates, the prompts embedded, the text store."""
    from pipeline.features.text import embed_prompts, store_path

    meta = cache.meta
    check_joint_space(meta, f"--head {head}")
    tower = cache_text_tower(meta)
    templates = expand_templates(list(cfg.zeroshot.templates))
    rendered = class_prompts(list(cache.class_names), templates, dict(cfg.zeroshot.prompts))
    flat = [p for per_class in rendered for p in per_class]
    store = Path(cache.path).resolve().parent
    emb = embed_prompts(tower, flat, store)
    scale, bias = tower.logits_params()
    params = {
        "text_embeddings": class_embeddings(emb, len(templates)),
        "logit_scale": scale,
        "logit_bias": bias,
        "activation": tower.activation,
    }
    info = {
        "templates": templates,
        "prompts": {name: per[0] for name, per in zip(cache.class_names, rendered, strict=True)},
        "n_prompts": len(flat),
        "logit_scale": scale,
        "logit_bias": bias,
        "activation": tower.activation,
        "text_model": tower.fingerprint,
        "text_store": str(store_path(store, tower)),
    }
    return params, info


def fit_extras(cfg: Config, cache, head: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What fitting ``head`` on ``cache`` takes beyond its configured parameters, and what a run records
    about it: for a text head its class embeddings, logit scale and bias, activation (:func:`text_weights`);
    nothing for the others. ``train`` and ``search``'s trials hand these in alike."""
    from pipeline.utils.config import TEXT_HEADS

    return text_weights(cfg, cache, head) if head in TEXT_HEADS else ({}, {})


def joint_space_text(cfg: Config, cache) -> dict[str, Any] | None:
    """The zero-shot parameters of ``cache``'s classes when it holds a text tower's joint-space embedding
    (a CLIP/SigLIP preset with its tokenizer, ``--pooling pooled``), else None: ``compare`` adds zero-shot
    and few-shot rows for such candidates only."""
    from pipeline.features.backbones.hub_presets import is_hub_name, read_preset
    from pipeline.features.text import TEXT_FAMILIES, TOKENIZER_FILE

    meta = cache.meta
    name = str(((meta.get("config") or {}).get("backbone") or {}).get("name") or meta.get("backbone"))
    if (
        meta.get("pooling") != "pooled"
        or list(meta.get("layers") or []) != ["output"]
        or not is_hub_name(name)
    ):
        return None
    try:
        preset = read_preset(name)
    except FeatcacheError:  # a hub preset not at hand: no text rows, the image probe still runs
        return None
    if preset.class_name not in TEXT_FAMILIES or not (Path(preset.folder) / TOKENIZER_FILE).is_file():
        return None
    return text_weights(cfg, cache, "zeroshot")[0]


def extras_digest(infos: list[dict[str, Any]]) -> str:
    """A short digest of what :func:`fit_extras` recorded (text model, templates, prompts): a search keys
    its trials by it, so other prompts are other trials."""
    import hashlib
    import json

    keep = [{k: i[k] for k in ("text_model", "templates", "prompts") if k in i} for i in infos]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def text_head_config(cfg: Config) -> Config:
    """A text head reads the embedding as cached (it L2-normalises it itself): no transforms before it."""
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, transforms=[]))
    if "given" in vars(cfg):
        out.given = cfg.given
    return out


def text_head_info(est) -> dict[str, Any]:
    """What a fitted few-shot head chose on val (nothing for the zero-shot head)."""
    if isinstance(est, FewShotClassifier):
        return {"mix": est.mix_, "val_accuracy_by_mix": est.val_accuracy_}
    return {}
