"""Stage 2: fit a head on cached features, evaluate it on val and test, and write a run folder.

The cache is read into memory when it fits a budget and streamed from HDF5 in chunks when it does not
(``train.streaming = auto | memory | stream``). Streaming fits transforms with ``partial_fit``
(StandardScaler, IncrementalPCA) and heads with ``partial_fit`` or a Keras ``PyDataset``. The val split
drives early stopping; the test split is read only by the final evaluation.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .errors import FeatcacheError
from .heads import (
    Head,
    build_transforms,
    class_weights,
    describe_transforms,
    make_head,
    parse_transforms,
    sgd_step,
)

MEMORY_FRACTION = 0.25  # of the RAM available now: room for the copy transforms make, and for the head


# --------------------------------------------------------------------------------------------- memory


def memory_budget() -> int:
    """Bytes the features may take in memory: ``$FEATCACHE_MEMORY_BUDGET`` or 25 % of available RAM."""
    env = os.environ.get("FEATCACHE_MEMORY_BUDGET")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise FeatcacheError(f"FEATCACHE_MEMORY_BUDGET must be a number of bytes, got {env!r}") from None
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * MEMORY_FRACTION)


def use_streaming(mode: str, n_bytes: int, budget: int | None = None) -> bool:
    """``memory``/``stream`` force the path; ``auto`` streams when the features exceed the budget."""
    if mode == "memory":
        return False
    if mode == "stream":
        return True
    if mode != "auto":
        raise FeatcacheError(f"train.streaming must be auto, memory or stream, got {mode!r}")
    return n_bytes > (memory_budget() if budget is None else budget)


# --------------------------------------------------------------------------------------------- data


_OPEN: dict[tuple[int, str], Any] = {}  # (pid, path) → FeatureCache: one handle per process


def _open_cache(path: str):
    from .store import FeatureCache

    key = (os.getpid(), path)
    if key not in _OPEN:
        _OPEN[key] = FeatureCache(path)
    return _OPEN[key]


def close_cache(path: str | Path) -> None:
    """Close this process's streaming handle on ``path``, if any."""
    handle = _OPEN.pop((os.getpid(), str(path)), None)
    if handle is not None:
        handle.close()


@dataclass
class Data:
    """Features of one cached layer for a set of rows: an array in memory, or HDF5 read on demand.

    Only ``rows`` are reachable, so a search built without the test rows cannot read them. It pickles
    small (path + rows; joblib memory-maps ``X``), which is how search trials reach their workers.
    """

    path: str
    layer: str
    labels: np.ndarray  # labels of every cache row (always in memory: one int per row)
    n_features: int
    rows: np.ndarray  # sorted rows this object may serve
    X: np.ndarray | None = None  # features of ``rows`` when in memory; None = streamed

    @property
    def streamed(self) -> bool:
        return self.X is None

    @classmethod
    def from_cache(cls, cache, layer: str, rows: np.ndarray, streamed: bool) -> Data:
        rows = np.sort(np.asarray(rows))
        n_features = int(cache.dataset(layer).shape[1])
        X = None if streamed else cache.features(layer, rows)
        return cls(str(cache.path), layer, cache.labels, n_features, rows, X)

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.rows, rows)
        pos = np.clip(pos, 0, max(len(self.rows) - 1, 0))
        if len(rows) and (len(self.rows) == 0 or not np.array_equal(self.rows[pos], rows)):
            raise FeatcacheError("internal: rows outside this data view were requested")
        return pos

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Features of ``rows`` (in that order), from memory or from HDF5."""
        rows = np.asarray(rows)
        pos = self._positions(rows)
        if self.X is not None:
            return self.X[pos]
        return _open_cache(self.path).features(self.layer, rows)

    def chunks(
        self,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        transform=None,
        min_rows: int = 1,
    ) -> ChunkSequence:
        self._positions(np.sort(np.asarray(rows)))
        return ChunkSequence(
            self, rows, batch_size, shuffle=shuffle, seed=seed, transform=transform, min_rows=min_rows
        )


class ChunkSequence:
    """(X, y) batches of ``rows`` read as contiguous HDF5 slices; memory stays at one batch.

    Rows are cut into short runs (``segment``) and each batch joins several runs from different places, so
    a shuffled epoch mixes classes even when the cache is sorted by class, while every read stays a slice.
    Supports ``len``/``[i]``/iteration and ``on_epoch_end`` (reshuffles), so Keras can use it as is.
    """

    def __init__(
        self,
        data: Data,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        transform=None,
        min_rows: int = 1,
    ):
        self.data = data
        rows = np.sort(np.asarray(rows))
        self.batch_size = max(int(batch_size), 1)
        seg = max(1, min(self.batch_size, max(8, self.batch_size // 8))) if shuffle else self.batch_size
        self.segments = [rows[i : i + seg] for i in range(0, len(rows), seg)]
        self.per_batch = max(1, self.batch_size // seg)
        self.shuffle, self.transform, self.min_rows = shuffle, transform, max(1, int(min_rows))
        self.rng = np.random.default_rng(seed)
        self.n_features = data.n_features
        self.reads = 0
        self._order = np.arange(len(self.segments))
        if shuffle:
            self.rng.shuffle(self._order)
        self._group()

    def _group(self) -> None:
        groups = [
            list(self._order[i : i + self.per_batch]) for i in range(0, len(self._order), self.per_batch)
        ]
        if len(groups) > 1 and sum(len(self.segments[s]) for s in groups[-1]) < self.min_rows:
            groups[-2].extend(groups.pop())  # IncrementalPCA needs >= n_components rows per batch
        self._groups = groups

    def __len__(self) -> int:
        return len(self._groups)

    def rows_of(self, i: int) -> np.ndarray:
        return np.concatenate([self.segments[s] for s in self._groups[i]])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self._groups):
            raise IndexError(i)
        parts = [self._read(self.segments[s]) for s in self._groups[i]]
        X = np.concatenate(parts) if len(parts) > 1 else parts[0]
        y = self.data.labels[self.rows_of(i)]
        if self.transform is not None:
            X = self.transform(X)
        return X, y

    def _read(self, seg: np.ndarray) -> np.ndarray:
        self.reads += 1
        if self.data.X is not None:
            return self.data.X[self.data._positions(seg)]
        ds = _open_cache(self.data.path).dataset(self.data.layer)
        lo, hi = int(seg[0]), int(seg[-1]) + 1
        if hi - lo <= 2 * len(seg):  # dense: one slice, the few rows between are dropped
            return np.asarray(ds[lo:hi], dtype=np.float32)[seg - lo]
        # sparse (e.g. val rows spread over the file): read only these rows, so memory stays at one batch
        return np.asarray(ds[seg], dtype=np.float32)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self._order)
            self._group()


# --------------------------------------------------------------------------------------------- fitting


@dataclass
class Fitted:
    """A fitted Pipeline and how it was fitted."""

    model: Any  # sklearn Pipeline: transforms + ("head", estimator)
    head: Head
    streamed: bool
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)  # partial_fit_calls, generator_batches, chunk_reads
    history: dict[str, list[float]] | None = None
    notes: list[str] = field(default_factory=list)


def _apply(steps, X):
    for _, est in steps:
        X = est.transform(X)
    return X


def _sample_weight(head: Head, classes: np.ndarray, y_all: np.ndarray, y: np.ndarray):
    weights = class_weights(classes, y_all, head.class_weight)
    if not weights:
        return None
    return np.asarray([weights[int(i)] for i in np.searchsorted(classes, y)], np.float64)


def fit_model(
    data: Data,
    train_rows: np.ndarray,
    val_rows: np.ndarray | None,
    head_name: str,
    params: dict[str, Any] | None = None,
    transforms: list[str] | tuple[str, ...] = ("standardize",),
    *,
    seed: int = 0,
    chunk_rows: int = 1024,
) -> Fitted:
    """Fit ``transforms`` + head on ``train_rows``; ``val_rows`` (may be None) only steers early stopping."""
    from sklearn.pipeline import Pipeline

    t0 = time.perf_counter()
    train_rows = np.sort(np.asarray(train_rows))
    if len(train_rows) == 0:
        raise FeatcacheError("no training rows: the cache's train split is empty")
    has_val = val_rows is not None and len(val_rows) > 0
    streamed = data.streamed
    head = make_head(head_name, params, seed=seed, streaming=streamed, n_train=len(train_rows))
    steps = build_transforms(
        list(transforms), streaming=streamed, n_samples=len(train_rows), n_features=data.n_features, seed=seed
    )
    y = data.labels[train_rows]
    if len(np.unique(y)) < 2:
        raise FeatcacheError("the training rows hold a single class; a classifier needs at least two")
    fitted = Fitted(None, head, streamed, 0.0)
    if head.ignored:
        fitted.notes.append(
            f"ignored in {'streaming' if streamed else 'memory'} mode: {', '.join(head.ignored)}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if streamed:
            _fit_streamed(
                data, train_rows, val_rows if has_val else None, head, steps, fitted, chunk_rows, seed
            )
        else:
            _fit_memory(data, train_rows, val_rows if has_val else None, head, steps, fitted)
    for w in caught:
        msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
        if (
            issubclass(w.category, (UserWarning, RuntimeWarning))
            and msg not in fitted.notes
            and len(fitted.notes) < 8
        ):
            fitted.notes.append(msg)
    fitted.model = Pipeline(steps + [("head", head.estimator)])
    fitted.history = getattr(head.estimator, "history_", None)
    fitted.seconds = time.perf_counter() - t0
    return fitted


def _fit_head(head: Head, X, y, fit_kwargs):
    try:
        head.estimator.fit(X, y, **fit_kwargs)
    except FeatcacheError:
        raise
    except (ValueError, TypeError) as e:  # sklearn's parameter validation: a bad value is a user error
        raise FeatcacheError(f"head {head.name!r}: {str(e).splitlines()[0][:300]}") from None


def _fit_memory(data: Data, train_rows, val_rows, head: Head, steps, fitted: Fitted) -> None:
    X, y = data.take(train_rows), data.labels[train_rows]
    for _, est in steps:
        X = est.fit_transform(X)
    kwargs: dict[str, Any] = {}
    if val_rows is not None and head.val_kwargs is not None:
        val_rows = val_rows[
            np.isin(data.labels[val_rows], y)
        ]  # a class unseen in train cannot steer stopping
        if len(val_rows):
            kwargs = head.val_kwargs(_apply(steps, data.take(val_rows)), data.labels[val_rows])
    if head.class_weight is not None:
        kwargs["sample_weight"] = _sample_weight(head, np.unique(y), y, y)
    _fit_head(head, X, y, kwargs)


def _fit_streamed(
    data: Data, train_rows, val_rows, head: Head, steps, fitted: Fitted, chunk_rows: int, seed: int
) -> None:
    stats = fitted.stats
    stats.update(partial_fit_calls=0, generator_batches=0, chunk_reads=0, transform_passes=0)
    # transforms, in order: each learns from chunks already passed through the steps before it
    for i, (_, est) in enumerate(steps):
        if not hasattr(est, "partial_fit"):  # stateless (Normalizer): one small chunk fixes its input width
            X0, _ = data.chunks(train_rows[:64], 64)[0]
            est.fit(_apply(steps[:i], X0))
            continue
        need = int(getattr(est, "n_components", None) or 1)
        # IncrementalPCA's SVD costs ~ (k + b)² per chunk of b rows: chunks of a few k are cheapest
        size = chunk_rows if need == 1 else min(chunk_rows, max(4 * need, 256))
        seq = data.chunks(train_rows, max(size, need), min_rows=need)
        for X, _ in seq:
            est.partial_fit(_apply(steps[:i], X))
        stats["chunk_reads"] += seq.reads
        stats["transform_passes"] += 1
    transform = (lambda X: _apply(steps, X)) if steps else None
    y_all = data.labels[train_rows]
    classes = np.unique(y_all)
    est = head.estimator
    if head.kind == "keras":
        seq = data.chunks(train_rows, int(est.batch_size), shuffle=True, seed=seed, transform=transform)
        if val_rows is not None:
            val_rows = val_rows[np.isin(data.labels[val_rows], classes)]
        val = (
            data.chunks(val_rows, 4096, transform=transform)
            if val_rows is not None and len(val_rows)
            else None
        )
        try:
            est.fit_stream(seq, val, y_all=y_all)
        except (ValueError, TypeError) as e:
            raise FeatcacheError(f"head {head.name!r}: {str(e).splitlines()[0][:300]}") from None
        stats["generator_batches"] = int(est.stream_batches_)
        stats["chunk_reads"] += seq.reads + (val.reads if val is not None else 0)
        return
    seq = data.chunks(train_rows, chunk_rows, shuffle=True, seed=seed, transform=transform)
    if head.auto_step:
        est.set_params(eta0=sgd_step(seq[0][0]))
        stats["eta0"] = est.eta0
    for _ in range(head.epochs):
        for X, y in seq:
            try:
                est.partial_fit(X, y, classes=classes, sample_weight=_sample_weight(head, classes, y_all, y))
            except (ValueError, TypeError) as e:
                raise FeatcacheError(f"head {head.name!r}: {str(e).splitlines()[0][:300]}") from None
            stats["partial_fit_calls"] += 1
        seq.on_epoch_end()
    stats["chunk_reads"] += seq.reads


# --------------------------------------------------------------------------------------------- predicting


@dataclass
class Predictions:
    rows: np.ndarray  # sorted cache rows
    y_true: np.ndarray
    y_pred: np.ndarray
    proba: np.ndarray  # n × n_classes of the cache (columns = cache class indices)
    calibrated: bool  # False: softmax of decision scores (margin heads), not probabilities


def _scores(model, X) -> tuple[np.ndarray, bool]:
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(X), np.float64), True
    d = np.asarray(model.decision_function(X), np.float64)
    if d.ndim == 1:
        d = np.stack([-d / 2, d / 2], axis=1)  # softmax([−s/2, s/2]) = sigmoid(s)
    d = d - d.max(axis=1, keepdims=True)
    e = np.exp(d)
    return e / e.sum(axis=1, keepdims=True), False


def predict_rows(model, data: Data, rows: np.ndarray, n_classes: int, batch_rows: int = 4096) -> Predictions:
    """Predict ``rows`` in chunks (bounded memory when streamed); probabilities spread to all cache classes."""
    rows = np.sort(np.asarray(rows))
    head_classes = np.asarray(model.steps[-1][1].classes_).astype(np.int64)
    out_p, calibrated = [], True
    if data.streamed:
        for X, _ in data.chunks(rows, batch_rows):
            p, calibrated = _scores(model, X)
            out_p.append(p)
    elif len(rows):
        p, calibrated = _scores(model, data.take(rows))
        out_p.append(p)
    p = np.concatenate(out_p) if out_p else np.zeros((0, len(head_classes)))
    full = np.zeros((len(rows), n_classes), np.float64)
    full[:, head_classes] = p
    y_pred = head_classes[np.argmax(p, axis=1)] if len(rows) else np.zeros(0, np.int64)
    return Predictions(rows, data.labels[rows], y_pred, full, calibrated)


def classification_metrics(pred: Predictions, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall, log loss, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
    )

    labels = list(range(len(class_names)))
    y, yp = pred.y_true, pred.y_pred
    if len(y) == 0:
        return {"n": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, rec, f1, support = precision_recall_fscore_support(y, yp, labels=labels, zero_division=0)
        present = [i for i in labels if support[i] > 0]
        out: dict[str, Any] = {
            "n": int(len(y)),
            "accuracy": float(accuracy_score(y, yp)),
            "balanced_accuracy": float(balanced_accuracy_score(y, yp)),
            "macro_f1": float(np.mean(f1[present])) if present else 0.0,
            "log_loss": None,
        }
        if pred.calibrated:
            p = np.clip(pred.proba, 1e-15, 1.0)
            out["log_loss"] = float(log_loss(y, p / p.sum(axis=1, keepdims=True), labels=labels))
    out["per_class"] = {
        name: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    out["confusion_matrix"] = confusion_matrix(y, yp, labels=labels).tolist()
    return out


# --------------------------------------------------------------------------------------------- train()


def resolve_cache(cfg: Config) -> Path:
    """``train.cache`` if set, else the cache that ``[data]`` + ``[backbone]`` describe; it must exist."""
    if cfg.train.cache:
        path = Path(cfg.train.cache)
    else:
        from .extract import resolve_cache_path

        path = resolve_cache_path(cfg)[0]
    if not path.is_file():
        raise FeatcacheError(f"no cache at {path}: run `featcache extract` first")
    return path


def runs_root(cfg: Config, cache_path: Path) -> Path:
    """``train.runs_dir``, else ``runs/`` next to the cache file."""
    return Path(cfg.train.runs_dir) if cfg.train.runs_dir else Path(cache_path).parent / "runs"


def resolve_params(params: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """``class_weight`` keys may be class names or indices (TOML keys are strings): map them to indices."""
    params = dict(params)
    cw = params.get("class_weight")
    if isinstance(cw, dict):
        mapped = {}
        for k, v in cw.items():
            if str(k) in class_names:
                mapped[class_names.index(str(k))] = float(v)
            elif str(k).lstrip("-").isdigit() and 0 <= int(k) < len(class_names):
                mapped[int(k)] = float(v)
            else:
                raise FeatcacheError(f"class_weight: unknown class {k!r} (classes: {', '.join(class_names)})")
        params["class_weight"] = mapped
    return params


@dataclass
class TrainRun:
    """What ``featcache train`` did: the run folder, the metrics, and how the data was read."""

    run_dir: Path
    head: str
    params: dict[str, Any]
    layer: str
    transforms: list[str]
    streamed: bool
    metrics: dict[str, Any]
    fitted: Fitted

    @property
    def model(self):
        return self.fitted.model

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.get("test", {}).get("accuracy")

    def summary(self) -> str:
        m = self.metrics
        params = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "defaults"
        lines = [
            f"head: {self.head} ({params}) · layer {self.layer} · transforms {' → '.join(self.transforms) or 'none'}",
            f"data: {'streamed from HDF5' if self.streamed else 'in memory'} · fit {self.fitted.seconds:.1f} s"
            + (f" · {m['fit'].get('epochs')} epochs" if m["fit"].get("epochs") else ""),
            "",
            f"{'split':<6} {'n':>6} {'accuracy':>9} {'bal_acc':>8} {'macro_f1':>9} {'log_loss':>9}",
        ]
        for split in ("val", "test"):
            s = m.get(split) or {}
            if not s.get("n"):
                lines.append(f"{split:<6} {0:>6} {'-':>9} {'-':>8} {'-':>9} {'-':>9}")
                continue
            ll = f"{s['log_loss']:.4f}" if s.get("log_loss") is not None else "-"
            lines.append(
                f"{split:<6} {s['n']:>6} {s['accuracy']:>9.4f} {s['balanced_accuracy']:>8.4f} {s['macro_f1']:>9.4f} {ll:>9}"
            )
        lines.append("")
        if self.test_accuracy is not None:
            lines.append(f"test accuracy: {self.test_accuracy:.4f}")
        for note in m.get("notes", []):
            lines.append(f"note: {note}")
        lines.append(f"run: {self.run_dir}")
        return "\n".join(lines)


def train(cfg: Config, *, run_dir: Path | None = None) -> TrainRun:
    """Fit ``cfg.train.head`` on the cache, evaluate on val and test, write ``<runs>/<id>/``."""
    from .store import FeatureCache

    t = cfg.train
    # fail fast on names, before any data is read
    parse_transforms(t.transforms)
    make_head(t.head, {k: v for k, v in t.params.items() if k != "class_weight"}, seed=t.seed)
    cache_path = resolve_cache(cfg)
    with FeatureCache(cache_path) as cache:
        layer = cache._layer(t.layer)
        params = resolve_params(t.params, cache.class_names)
        train_rows, val_rows, test_rows = cache.rows("train"), cache.rows("val"), cache.rows("test")
        dim = int(cache.dataset(layer).shape[1])
        streamed = use_streaming(t.streaming, cache.n_rows * dim * 4)
        data = Data.from_cache(cache, layer, np.arange(cache.n_rows), streamed)
        fitted = fit_model(data, train_rows, val_rows, t.head, params, t.transforms, seed=t.seed)
        n_classes = len(cache.class_names)
        preds = {
            name: predict_rows(fitted.model, data, rows, n_classes)
            for name, rows in (("val", val_rows), ("test", test_rows))
        }
        notes = list(fitted.notes)
        if not len(val_rows):
            notes.append("the val split is empty: no early stopping, no val metrics")
        if not len(test_rows):
            notes.append("the test split is empty: no test metrics")
        out = run_dir or _new_run(cfg, cache_path, t.head)
        metrics = _metrics(cfg, cache, layer, params, fitted, preds, notes, out)
        _write_run(out, fitted, metrics, preds["test"], cache)
    close_cache(cache_path)
    return TrainRun(
        out,
        t.head,
        dict(t.params),
        layer,
        [str(x) for x in parse_transforms(t.transforms)],
        streamed,
        metrics,
        fitted,
    )


def _new_run(cfg: Config, cache_path: Path, head: str) -> Path:
    from .runs import new_run_dir

    return new_run_dir(runs_root(cfg, cache_path), head)


def _metrics(
    cfg: Config, cache, layer, params, fitted: Fitted, preds, notes, run_dir: Path
) -> dict[str, Any]:
    head_est = fitted.model.steps[-1][1]
    fit_info: dict[str, Any] = {
        "seconds": round(fitted.seconds, 3),
        "estimator": type(head_est).__name__,
        **fitted.stats,
    }
    if fitted.history:
        fit_info["epochs"] = len(fitted.history.get("loss", []))
        if getattr(head_est, "best_epoch_", None):
            fit_info["best_epoch"] = head_est.best_epoch_
    elif getattr(head_est, "n_iter_", None) is not None and not fitted.streamed:
        fit_info["n_iter"] = np.asarray(head_est.n_iter_).max().item()
    if fitted.head.streaming and fitted.head.kind == "sklearn":
        fit_info["epochs"] = fitted.head.epochs
    counts = {s: int((cache.split == i).sum()) for i, s in enumerate(("train", "val", "test"))}
    return {
        "run_id": run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "head": cfg.train.head,
        "head_kind": fitted.head.kind,
        "params": params,
        "layer": layer,
        "transforms": [str(x) for x in parse_transforms(cfg.train.transforms)],
        "transform_chain": describe_transforms(fitted.model.steps[:-1]),
        "class_names": list(cache.class_names),
        "head_classes": np.asarray(head_est.classes_).astype(int).tolist(),  # output column → class index
        "n_features": int(cache.dataset(layer).shape[1]),
        "streamed": fitted.streamed,
        "fit": fit_info,
        "probabilities": "predict_proba"
        if preds["test"].calibrated
        else "softmax of decision_function (uncalibrated; no log loss)",
        "cache": {
            "path": str(Path(cache.path).resolve()),
            "fingerprint": cache.fingerprint,
            "backbone": cache.meta.get("backbone"),
            "dataset": cache.meta.get("dataset"),
            "image_size": cache.meta.get("image_size"),
            "rows": counts,
        },
        "val": classification_metrics(preds["val"], cache.class_names),
        "test": classification_metrics(preds["test"], cache.class_names),
        "history": fitted.history,
        "notes": notes,
        "config": cfg.to_dict(),
    }


def _write_run(run_dir: Path, fitted: Fitted, metrics: dict[str, Any], test: Predictions, cache) -> None:
    from .runs import (
        plot_learning_curves,
        plot_split_confusions,
        save_model,
        write_json,
        write_manifest,
        write_misclassified,
    )

    kind, model_files = save_model(run_dir, fitted.model)
    plot_split_confusions(run_dir, metrics, cache.class_names)
    if fitted.history:
        plot_learning_curves(
            run_dir / "learning_curves.png", fitted.history, f"{metrics['head']} learning curves"
        )
    keys = [cache.keys[int(r)] for r in test.rows]
    prob = test.proba[np.arange(len(test.rows)), test.y_pred] if len(test.rows) else np.zeros(0)
    metrics["test"]["misclassified"] = write_misclassified(
        run_dir / "misclassified.csv", keys, test.y_true, test.y_pred, prob, cache.class_names
    )
    write_json(run_dir / "metrics.json", metrics)
    write_manifest(run_dir, kind, model_files)


from ._callable import callable_module  # noqa: E402

callable_module(__name__, "train")
