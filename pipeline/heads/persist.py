"""Saving and loading a run's fitted model (transforms + head), after the manifest check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import write_json
from pipeline.utils.runs import verify_run


def save_model(run_dir: Path, model) -> tuple[str, list[str]]:
    """Write the fitted Pipeline; Keras heads go to ``.keras`` (no pickle), the rest through joblib."""
    import joblib
    from sklearn.pipeline import Pipeline

    from pipeline.heads.keras_head import KerasHead

    head = model.steps[-1][1]
    if isinstance(head, KerasHead):
        transforms = Pipeline(model.steps[:-1]) if len(model.steps) > 1 else None
        joblib.dump(transforms, run_dir / "transforms.joblib")
        head.model_.save(run_dir / "head.keras")
        state = {
            "params": head.get_params(deep=False),
            "classes": head.classes_.tolist(),
            "n_features_in": int(head.n_features_in_),
            "step": model.steps[-1][0],
        }
        write_json(run_dir / "head.json", state)
        return "keras", ["transforms.joblib", "head.keras", "head.json"]
    joblib.dump(model, run_dir / "model.joblib")
    return "sklearn", ["model.joblib"]


def load_model(run_dir: str | Path):
    """The fitted scikit-learn Pipeline of a run (transforms + head), after checking the manifest.

    ``predict`` returns indices into the run's ``class_names`` (see :func:`load_run`).
    """
    import joblib

    run_dir = Path(run_dir)
    manifest = verify_run(run_dir)
    try:
        if manifest.get("kind") == "keras":
            return _load_keras(run_dir)
        return joblib.load(run_dir / "model.joblib")
    except FeatcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable artifact is one clear user-facing error
        raise FeatcacheError(
            f"{run_dir}: cannot load the model ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def _load_keras(run_dir: Path):
    import joblib
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
    transforms = joblib.load(run_dir / "transforms.joblib")
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
