"""Run folders: where a fitted head, its metrics and its plots live, and how a model is loaded back.

``<runs>/<id>/`` holds the model (``model.joblib``; or ``transforms.joblib`` + ``head.keras`` +
``head.json`` for Keras heads), ``metrics.json``, plots and ``misclassified.csv``. ``manifest.json`` is
written last with the sha256 of every other file: a folder without it is an unfinished run, and
:func:`load_model` refuses any file whose bytes changed. That catches truncation and accidental edits before
anything is unpickled; it is not a signature, so only load runs from places you trust.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FeatcacheError

MANIFEST = "manifest.json"
RUN_FORMAT = "featcache-run/1"


# --------------------------------------------------------------------------------------------- folders


def new_run_dir(root: str | Path, head: str) -> Path:
    """``<root>/20261124-173000-logistic-ab12``: sortable by time, unique across concurrent runs."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatcacheError(f"runs folder {root}: cannot create ({e.strerror})") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        d = root / f"{stamp}-{head}-{secrets.token_hex(2)}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise FeatcacheError(f"runs folder {root}: cannot find a free run id")  # pragma: no cover


def latest_run(root: str | Path) -> Path:
    """The newest complete run (one with a manifest) under ``root``."""
    runs = sorted(p.parent for p in Path(root).glob(f"*/{MANIFEST}"))
    if not runs:
        raise FeatcacheError(f"no finished runs in {root}: run `featcache train` first")
    return runs[-1]


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, tuple, set)):
        return str(o) if isinstance(o, Path) else list(o)
    return repr(o)


# --------------------------------------------------------------------------------------------- manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(run_dir: Path, kind: str, model_files: Sequence[str]) -> dict[str, Any]:
    """Hash every file in the run folder (the model's and the reports'); written last, atomically."""
    files = {}
    for p in sorted(run_dir.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format": RUN_FORMAT,
        "kind": kind,
        "model_files": list(model_files),
        "files": files,
        "created": time.time(),
    }
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def verify_run(run_dir: str | Path) -> dict[str, Any]:
    """Check every listed file against its sha256; raise naming the first one that differs or is missing."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise FeatcacheError(f"run folder not found: {run_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatcacheError(
            f"{run_dir}: no {MANIFEST}; the run did not finish or is not a featcache run"
        ) from None
    except (OSError, ValueError) as e:
        raise FeatcacheError(f"{path}: unreadable manifest ({e}); refusing to load this run") from None
    if manifest.get("format") != RUN_FORMAT or not isinstance(manifest.get("files"), dict):
        raise FeatcacheError(f"{path}: not a {RUN_FORMAT} manifest")
    for name, info in manifest["files"].items():
        p = run_dir / name
        if not p.is_file():
            raise FeatcacheError(f"{p}: listed in the manifest but missing; refusing to load this run")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise FeatcacheError(
                f"{p}: {size} bytes, manifest says {info.get('bytes')} (truncated or replaced); refusing to load"
            )
        if sha256_file(p) != info.get("sha256"):
            raise FeatcacheError(
                f"{p}: sha256 differs from the manifest (file modified or corrupted); refusing to load"
            )
    for name in manifest.get("model_files", []):
        if name not in manifest["files"]:
            raise FeatcacheError(f"{path}: model file {name} is not covered by the manifest")
    return manifest


# --------------------------------------------------------------------------------------------- models


def save_model(run_dir: Path, model) -> tuple[str, list[str]]:
    """Write the fitted Pipeline; Keras heads go to ``.keras`` (no pickle), the rest through joblib."""
    import joblib
    from sklearn.pipeline import Pipeline

    from .heads import KerasHead

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

    from .heads import KerasHead

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


# --------------------------------------------------------------------------------------------- reports


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, cm: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> None:
    plt = _plt()
    cm = np.asarray(cm)
    n = len(class_names)
    size = min(14.0, 2.5 + 0.55 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        hi = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if cm[i, j] > hi / 2 else "black",
                    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_split_confusions(
    run_dir: Path, metrics: dict[str, Any], class_names: Sequence[str], title: str = ""
) -> None:
    """``confusion_val.png`` and ``confusion_test.png`` of a run, titled with the split's accuracy."""
    for split in ("val", "test"):
        cm = metrics[split].get("confusion_matrix")
        if cm:
            label = f"{title}{metrics['head']} · {split} · acc {metrics[split]['accuracy']:.3f}"
            plot_confusion(run_dir / f"confusion_{split}.png", cm, class_names, label)


def plot_learning_curves(path: Path, history: dict[str, list[float]], title: str) -> None:
    plt = _plt()
    metrics = [m for m in ("loss", "accuracy") if m in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        epochs = range(1, len(history[m]) + 1)
        ax.plot(epochs, history[m], label="train")
        if f"val_{m}" in history:
            ax.plot(epochs, history[f"val_{m}"], label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(m)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_misclassified(
    path: Path,
    keys: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    prob: np.ndarray,
    class_names: Sequence[str],
) -> int:
    """One row per wrong test prediction, most confident mistakes first: where to look at the data."""
    wrong = np.flatnonzero(y_true != y_pred)
    wrong = wrong[np.argsort(-prob[wrong], kind="stable")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "true", "predicted", "probability"])
        for i in wrong:
            w.writerow([keys[i], class_names[int(y_true[i])], class_names[int(y_pred[i])], f"{prob[i]:.4f}"])
    return len(wrong)
