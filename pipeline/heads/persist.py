"""Saving and loading a run's fitted model (transforms + head), after the manifest check.

Nothing is pickled: scikit-learn steps are written with skops and loaded with an explicit list of trusted
types, Keras heads as ``.keras`` (``safe_mode``) + JSON. Runs written by featcache 0.1 (joblib pickles)
still load, after their manifest check, with a one-line note.
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
from pipeline.utils.runs import verify_run

#: Types outside skops' default trust that a featcache head legitimately holds. Anything else in a model
#: file is refused before it is built: loading a run folder someone sent you must not run their code.
TRUSTED_TYPES = frozenset(
    {
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    }
)

#: Model files of runs written before skops (featcache 0.1): pickles, loaded only after the manifest check.
LEGACY_FILES = ("model.joblib", "transforms.joblib")


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


def _load_legacy(run_dir: Path, name: str):
    """A 0.1 run's pickle: its bytes were checked against the manifest just before."""
    import joblib

    key = str((run_dir / name).resolve())
    if key not in _noted:  # one note per file and process
        _noted.add(key)
        print(
            f"note: {run_dir.name} was saved by featcache 0.1 ({name}, a pickle); loaded after its manifest "
            "check — retrain to get a skops file",
            file=sys.stderr,
        )
    return joblib.load(run_dir / name)


_noted: set[str] = set()


def load_model(run_dir: str | Path):
    """The fitted scikit-learn Pipeline of a run (transforms + head), after checking the manifest.

    ``predict`` returns indices into the run's ``class_names`` (see :func:`load_run`).
    """
    run_dir = Path(run_dir)
    manifest = verify_run(run_dir)
    files = set(manifest.get("model_files", []))
    try:
        if manifest.get("kind") == "keras":
            return _load_keras(run_dir, files)
        if "model.skops" in files:
            return load_skops(run_dir / "model.skops")
        return _load_legacy(run_dir, "model.joblib")
    except FeatcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable artifact is one clear user-facing error
        raise FeatcacheError(
            f"{run_dir}: cannot load the model ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def _load_keras(run_dir: Path, files: set[str]):
    import keras
    from sklearn.pipeline import Pipeline

    from pipeline.heads.keras_head import KerasHead

    state = json.loads((run_dir / "head.json").read_text(encoding="utf-8"))
    params = dict(state["params"])
    if isinstance(params.get("hidden"), list):
        params["hidden"] = tuple(params["hidden"])
    head = KerasHead(**params)
    head.classes_ = np.asarray(state["classes"])
    head.n_features_in_ = state["n_features_in"]
    head.model_ = keras.saving.load_model(run_dir / "head.keras", safe_mode=True)
    if "transforms.skops" in files:
        transforms = load_skops(run_dir / "transforms.skops")
    elif "transforms.joblib" in files:
        transforms = _load_legacy(run_dir, "transforms.joblib")
    else:
        transforms = None
    steps = list(transforms.steps) if transforms is not None else []
    return Pipeline(steps + [(state.get("step", "head"), head)])


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


def load_run(run_dir: str | Path) -> LoadedRun:
    run_dir = Path(run_dir)
    model = load_model(run_dir)  # verifies metrics.json too
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return LoadedRun(run_dir, model, metrics)
