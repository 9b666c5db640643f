"""Saving and loading a run's fitted model (transforms + head), after the manifest check.

Nothing is pickled: scikit-learn steps are written with skops and loaded with an explicit list of trusted
types, Keras heads as ``.keras`` (``safe_mode``) + JSON. Runs written by featcache 0.1 hold joblib pickles:
a manifest proves which bytes they are, not who wrote them, so they load only when the caller trusts them
(``trust_pickle=True``, ``--trust-pickle``); :func:`upgrade_run` rewrites such a run as skops once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, write_json
from pipeline.utils.runs import METRICS, read_metrics, verify_run

#: Types outside skops' default trust that a featcache head legitimately holds. Anything else in a model
#: file is refused before it is built: loading a run folder someone sent you must not run their code.
TRUSTED_TYPES = frozenset(
    {
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "pipeline.heads.zeroshot.ZeroShotClassifier",
        "pipeline.heads.zeroshot.FewShotClassifier",
        "pipeline.heads.logistic.BlasLogisticRegression",  # the logistic head (a LogisticRegression)
    }
)


def save_model(run_dir: Path, model) -> tuple[str, list[str]]:
    """Write the fitted Pipeline without pickle: scikit-learn steps through skops, Keras heads as ``.keras``."""
    import skops.io as sio
    from sklearn.pipeline import Pipeline

    from pipeline.heads.keras_head import KerasHead

    head = model.steps[-1][1]
    if isinstance(head, KerasHead):
        files = []
        if len(model.steps) > 1:
            with atomic_path(run_dir / "transforms.skops") as tmp:
                sio.dump(Pipeline(model.steps[:-1]), tmp)
            files.append("transforms.skops")
        with atomic_path(run_dir / "head.keras") as tmp:
            head.model_.save(tmp)
        state = {
            "params": head.get_params(deep=False),
            "classes": head.classes_.tolist(),
            "n_features_in": int(head.n_features_in_),
            "step": model.steps[-1][0],
        }
        if getattr(head, "multilabel_", False):  # Dense(C, sigmoid): one probability per class
            state["task"] = "multilabel"
        write_json(run_dir / "head.json", state)
        return "keras", [*files, "head.keras", "head.json"]
    with atomic_path(run_dir / "model.skops") as tmp:
        sio.dump(model, tmp)
    return "sklearn", ["model.skops"]


def load_skops(path: Path):
    """A skops file, building only the types skops trusts by default and those in :data:`TRUSTED_TYPES`."""
    import skops.io as sio

    untrusted = sio.get_untrusted_types(file=path)
    refused = sorted(set(untrusted) - TRUSTED_TYPES)
    if refused:
        raise FeatcacheError(
            f"{path}: refusing to load types featcache does not trust: {', '.join(refused[:5])}"
        )
    return sio.load(path, trusted=list(untrusted))


#: how to load or convert a 0.1 run's pickles, said wherever one is refused
TRUST_HINT = "pass --trust-pickle (trust_pickle=True in Python) only if you trust whoever wrote it"


class PickleRefused(FeatcacheError):
    """A run's model file is a pickle and the caller did not opt in: loading it could run any code."""


def _load_legacy(run_dir: Path, name: str, trust_pickle: bool):
    """A 0.1 run's pickle, only on request: its manifest proves which bytes these are, not who wrote them."""
    path = run_dir / name
    if not trust_pickle:
        raise PickleRefused(
            f"{path}: a pickle (a featcache 0.1 run), and loading a pickle runs whatever code it holds; "
            f"refused — {TRUST_HINT}, or convert it once: featcache runs upgrade {run_dir} --trust-pickle"
        )
    import joblib

    key = str(path.resolve())
    if key not in _noted:  # one note per file and process
        _noted.add(key)
        print(
            f"note: {run_dir.name} was saved by featcache 0.1 ({name}, a pickle); loaded because you trust it "
            f"— `featcache runs upgrade {run_dir} --trust-pickle` rewrites it as skops",
            file=sys.stderr,
        )
    return joblib.load(path)


_noted: set[str] = set()

#: the model files each manifest ``kind`` stands for; anything else is not a run this release wrote
KIND_FILES = {
    "sklearn": ({"model.skops"}, {"model.joblib"}),
    "keras": ({"head.keras", "head.json"}, {"head.keras", "head.json"}),
}


def load_model(run_dir: str | Path, *, trust_pickle: bool = False):
    """The fitted scikit-learn Pipeline of a run (transforms + head), after checking the manifest.

    ``predict`` returns indices into the run's ``class_names`` (see :func:`load_run`). Pickles (runs
    written by 0.1) load only with ``trust_pickle=True``.
    """
    run_dir = Path(run_dir)
    manifest = verify_run(run_dir)
    kind, files = manifest.get("kind"), set(manifest.get("model_files", []))
    if kind not in KIND_FILES or not any(want <= files for want in KIND_FILES[kind]):
        raise FeatcacheError(
            f"{run_dir / 'manifest.json'}: kind {str(kind)[:40]!r} with model files "
            f"{sorted(files)[:6]} is not a featcache model; refusing to load this run"
        )
    try:
        if kind == "keras":
            model = _load_keras(run_dir, files, trust_pickle)
        elif "model.skops" in files:
            model = load_skops(run_dir / "model.skops")
        else:
            model = _load_legacy(run_dir, "model.joblib", trust_pickle)
    except FeatcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable artifact is one clear user-facing error
        raise FeatcacheError(
            f"{run_dir}: cannot load the model ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    return check_model(model, run_dir)


def check_model(model, run_dir: Path):
    """A loaded model is a scikit-learn Pipeline ending in a classifier, or the run is refused."""
    from sklearn.pipeline import Pipeline

    head = model.steps[-1][1] if isinstance(model, Pipeline) and model.steps else None
    if head is None or not hasattr(head, "predict") or not hasattr(head, "classes_"):
        raise FeatcacheError(
            f"{run_dir}: the model file holds a {type(model).__name__}, not a fitted featcache classifier "
            "pipeline; refusing to use this run"
        )
    return model


def _load_keras(run_dir: Path, files: set[str], trust_pickle: bool):
    import keras
    from sklearn.pipeline import Pipeline

    from pipeline.heads.keras_head import KerasHead

    state = json.loads((run_dir / "head.json").read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise FeatcacheError(f"{run_dir / 'head.json'}: not a Keras head description")
    if "transforms.skops" in files:
        transforms = load_skops(run_dir / "transforms.skops")
    elif "transforms.joblib" in files:
        transforms = _load_legacy(run_dir, "transforms.joblib", trust_pickle)
    else:
        transforms = None
    if transforms is not None and not isinstance(transforms, Pipeline):
        raise FeatcacheError(
            f"{run_dir}: the transforms file holds a {type(transforms).__name__}, not a Pipeline"
        )
    params = dict(state["params"])
    if isinstance(params.get("hidden"), list):
        params["hidden"] = tuple(params["hidden"])
    head = KerasHead(**params)
    head.classes_ = np.asarray(state["classes"])
    head.multilabel_ = state.get("task") == "multilabel"
    head.n_features_in_ = int(state["n_features_in"])
    head.model_ = keras.saving.load_model(run_dir / "head.keras", safe_mode=True)
    steps = list(transforms.steps) if transforms is not None else []
    return Pipeline(steps + [(str(state.get("step", "head")), head)])


@dataclass
class LoadedRun:
    """A run read back without the cache: the model plus what is needed to use and describe it."""

    path: Path
    model: Any
    metrics: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return self.metrics["class_names"]

    @property
    def layer(self) -> str:
        return self.metrics["layer"]

    def predict_names(self, X: np.ndarray) -> list[str]:
        return [self.class_names[int(i)] for i in self.model.predict(X)]


def load_run(run_dir: str | Path, *, trust_pickle: bool = False) -> LoadedRun:
    run_dir = Path(run_dir)
    model = load_model(run_dir, trust_pickle=trust_pickle)  # verifies metrics.json too
    metrics = read_metrics(run_dir)
    names = metrics.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FeatcacheError(f"{run_dir / METRICS}: no list of class names; not a featcache run")
    return LoadedRun(run_dir, model, metrics)


#: the pickles a 0.1 run may hold, which :func:`upgrade_run` replaces
PICKLE_FILES = ("model.joblib", "transforms.joblib")


def upgrade_run(run_dir: str | Path, *, trust_pickle: bool = False) -> list[str]:
    """Rewrite a 0.1 run's pickles as skops files with a fresh manifest; the new model files.

    The pickles are loaded once (so the caller must trust them), saved again without pickle, read back
    through the safe path and compared on random rows before the manifest switches to the new files.
    """
    from pipeline.utils.runs import write_manifest

    run_dir = Path(run_dir)
    manifest = verify_run(run_dir)
    if not set(manifest.get("model_files", [])) & set(PICKLE_FILES):
        raise FeatcacheError(f"{run_dir}: holds no pickle (model files: skops/.keras); nothing to upgrade")
    old = load_model(run_dir, trust_pickle=trust_pickle)
    kind, files = save_model(run_dir, old)
    new = check_model(_load_new(run_dir, kind, files), run_dir)
    X = np.random.default_rng(0).normal(size=(16, int(old.n_features_in_))).astype(np.float32)
    if not np.array_equal(old.predict(X), new.predict(X)):
        raise FeatcacheError(
            f"{run_dir}: the rewritten model predicts differently; the run is left as it was"
        )
    created = manifest.get("created")
    write_manifest(
        run_dir, kind, files, skip=PICKLE_FILES, created=created if isinstance(created, float) else 0
    )
    for name in PICKLE_FILES:
        (run_dir / name).unlink(missing_ok=True)
    return files


def _load_new(run_dir: Path, kind: str, files: list[str]):
    if kind == "keras":
        return _load_keras(run_dir, set(files), trust_pickle=False)
    return load_skops(run_dir / "model.skops")
