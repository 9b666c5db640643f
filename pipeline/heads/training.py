"""Fitting a head on a cache and writing it as a run folder: what ``featcache train`` does, and what a
search's refit does with its best trial, so both write the same files, metrics and manifest.

The cache is read into memory when it fits a budget and streamed from HDF5 in chunks when it does not
(``train.streaming = auto | memory | stream``). Streaming fits transforms with ``partial_fit``
(StandardScaler, IncrementalPCA) and heads with ``partial_fit`` or a Keras ``PyDataset``. The val split
drives early stopping; the test split is read only by the final evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.locate import runs_root
from pipeline.cache.reader import HANDOVER_ROWS, Data, close_cache, read_parts, use_streaming
from pipeline.cache.state import cache_state
from pipeline.data.splits import small_class_note
from pipeline.heads.fitting import Fitted, Predictions, fit_model, predict_rows
from pipeline.heads.metrics import classification_metrics, multilabel_metrics
from pipeline.heads.multilabel import choose_thresholds, fit_multilabel, multilabel_params, predict_multilabel
from pipeline.heads.registry import make_head
from pipeline.heads.transforms import describe_transforms, parse_transforms
from pipeline.heads.zeroshot import fit_extras, text_head_config, text_head_info
from pipeline.utils.config import MULTILABEL, SPLITS, TEXT_HEADS, Config, TrainConfig
from pipeline.utils.errors import FeatcacheError


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
        ]
        if m.get("task") == MULTILABEL:
            return "\n".join(lines + multilabel_summary(m) + [f"run: {self.run_dir}"])
        lines.append(f"{'split':<6} {'n':>6} {'accuracy':>9} {'bal_acc':>8} {'macro_f1':>9} {'log_loss':>9}")
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


def check_train_config(t: TrainConfig) -> None:
    """Unknown transforms, heads or head parameters fail here, before any data is read (a multi-label
    cache's heads are checked when it is open: :func:`pipeline.heads.multilabel.check_multilabel_head`)."""
    parse_transforms(t.transforms)
    make_head(t.head, {k: v for k, v in t.params.items() if k != "class_weight"}, seed=t.seed)


def fit_run(
    cfg: Config, cache_path: Path, *, run_dir: Path | None = None, extra: dict[str, Any] | None = None
) -> TrainRun:
    """Fit ``cfg.train.head`` on the cache at ``cache_path``, evaluate on val and test, write
    ``<runs>/<id>/`` (or ``run_dir``); ``extra`` keys join ``metrics.json`` (a refit names its search)."""
    from pipeline.cache.store import FeatureCache

    t = cfg.train
    with FeatureCache(cache_path) as cache:
        layer = cache.layer_name(t.layer)
        params = resolve_params(t.params, cache.class_names)
        train_rows, val_rows, test_rows = cache.rows("train"), cache.rows("val"), cache.rows("test")
        dim = int(cache.dataset(layer).shape[1])
        streamed = use_streaming(t.streaming, cache.n_rows * dim * 4, multilabel=cache.multilabel)
        data, train_X, novelty = _read(cache, layer, cfg, streamed)
        if t.head in TEXT_HEADS:  # the class names through the text tower; no transforms before it
            cfg = text_head_config(cfg)
            t = cfg.train
        extras, info = fit_extras(cfg, cache, t.head)
        text = {"zeroshot": info} if info else {}
        if cache.multilabel:
            fitted, preds, scores, task = _fit_multilabel(cache, data, t, params, extras)
            task |= text
        else:
            fit_params, task = {**params, **extras}, text
            fitted = fit_model(
                data, train_rows, val_rows, t.head, fit_params, t.transforms, seed=t.seed, train_X=train_X
            )
            del train_X
            if task:
                task["zeroshot"].update(text_head_info(fitted.model.steps[-1][1]))
            n_classes = len(cache.class_names)
            preds = {
                name: predict_rows(fitted.model, data, rows, n_classes)
                for name, rows in (("val", val_rows), ("test", test_rows))
            }
            scores = {name: classification_metrics(p, cache.class_names) for name, p in preds.items()}
        notes = list(fitted.notes)
        if not len(val_rows):
            notes.append("the val split is empty: no early stopping, no val metrics")
        if not len(test_rows):
            notes.append("the test split is empty: no test metrics")
        small = None if cache.multilabel else small_class_note(cache.labels, cache.split, cache.class_names)
        if small:
            notes.append(small)
        out = run_dir or _new_run(cfg, cache_path, t.head)
        metrics = {
            **_metrics(cfg, cache, layer, params, fitted, preds, scores, notes, out),
            **task,
            **novelty,
            **(extra or {}),
        }
        _write_run(out, fitted, metrics, preds, cache)
    close_cache(cache_path)
    return TrainRun(
        out,
        t.head,
        dict(t.params),
        layer,
        [str(x) for x in parse_transforms(cfg.train.transforms)],
        streamed,
        metrics,
        fitted,
    )


def _read(cache, layer: str, cfg: Config, streamed: bool) -> tuple[Data, np.ndarray | None, dict[str, Any]]:
    """The rows a run reads, and the novelty threshold (:func:`run_novelty`). A single-label fit in memory
    reads its train rows once, into the array its transforms then overwrite (at 1M rows no copy beside
    every row: peak memory about the features), and its val and test rows into another, in one pass over
    the file (:func:`~pipeline.cache.reader.read_parts`), the novelty pass running on the train rows as
    they land. Otherwise every row, in memory or streamed."""
    if streamed or cache.multilabel:
        data = Data.from_cache(cache, layer, np.arange(cache.n_rows), streamed)
        return data, None, run_novelty(cache, layer, cfg, data)
    scored = np.union1d(cache.rows("val"), cache.rows("test"))
    nearest = _nearest_train(cache, cfg, layer)
    train_X, scored_X = read_parts(
        cache, layer, [cache.rows("train"), scored], None if nearest is None else nearest.add
    )
    data = Data(str(cache.path), layer, cache.labels, train_X.shape[1], scored, scored_X)
    if nearest is None:
        return data, train_X, run_novelty(cache, layer, cfg, data)
    return data, train_X, {"novelty": nearest.threshold(cfg.index.novelty_percentile, len(cache.rows("val")))}


def run_novelty(cache, layer: str, cfg: Config, data: Data) -> dict[str, Any]:
    """``{"novelty": ...}``: the threshold ``predict`` flags novel images above, set on the val split
    (:func:`pipeline.index.novelty.val_threshold`); ``{}`` without val or train rows. From
    ``index.exact_below`` rows on, a sample of the val rows against every train row, read from ``data``
    block by block (:class:`~pipeline.index.novelty.NearestTrain`): a run never waits for an index."""
    from pipeline.index.novelty import val_threshold
    from pipeline.index.search import open_index

    if cache.n_rows < cfg.index.exact_below:
        found = val_threshold(open_index(cache, layer, cfg.index), cfg.index.novelty_percentile)
        return {"novelty": found} if found else {}
    nearest = _nearest_train(cache, cfg, layer)
    if nearest is None:
        return {}
    train = cache.rows("train")
    for i in range(0, len(train), HANDOVER_ROWS):
        nearest.add(data.take(train[i : i + HANDOVER_ROWS]))
    return {"novelty": nearest.threshold(cfg.index.novelty_percentile, len(cache.rows("val")))}


def _nearest_train(cache, cfg: Config, layer: str):
    """A large cache's novelty pass, waiting for the train rows: a sample of the val rows (read here); None
    below ``index.exact_below`` rows (the index sets the threshold) or without train or val rows."""
    from pipeline.index.novelty import VAL_SAMPLE, NearestTrain

    train, val = cache.rows("train"), cache.rows("val")
    if cache.n_rows < cfg.index.exact_below or not len(train) or not len(val):
        return None
    rng = np.random.default_rng(cfg.train.seed)
    sample = np.sort(rng.choice(val, min(len(val), VAL_SAMPLE), replace=False))
    return NearestTrain(cache.features(layer, sample))


def _fit_multilabel(cache, data: Data, t: TrainConfig, params: dict[str, Any], extras: dict[str, Any]):
    """One-vs-rest (or Keras or zero-shot sigmoid) fit, thresholds chosen on val (0.5 without val rows), val
    and test scored at them; ``extras``: what :func:`~pipeline.heads.zeroshot.fit_extras` hands a text head."""
    names = cache.class_names
    fitted = fit_multilabel(
        data,
        cache.rows("train"),
        t.head,
        {**params, **extras},
        t.transforms,
        seed=t.seed,
        val_rows=cache.rows("val"),
    )
    val = predict_multilabel(fitted.model, data, cache.rows("val"))
    thresholds = choose_thresholds(val.y_true, val.proba) if len(val.rows) else np.full(len(names), 0.5)
    if not len(val.rows):
        fitted.notes.append("no val rows to choose the thresholds on: every class's threshold is 0.5")
    preds = {
        name: predict_multilabel(fitted.model, data, cache.rows(name), thresholds) for name in ("val", "test")
    }
    scores = {name: multilabel_metrics(p, names, thresholds) for name, p in preds.items()}
    task = {
        "task": MULTILABEL,
        "params": multilabel_params(t.head, params),  # with the multi-label defaults it was fitted with
        "thresholds": dict(zip(names, thresholds.tolist(), strict=True)),
        "probabilities": "predict_proba per class"
        if preds["test"].calibrated
        else "sigmoid of decision_function per class (uncalibrated)",
    }
    return fitted, preds, scores, task


def multilabel_summary(m: dict[str, Any]) -> list[str]:
    """The val/test table of a multi-label run: mAP, F1 at the chosen thresholds, subset accuracy."""
    lines = [
        f"{'split':<6} {'n':>6} {'macro_mAP':>9} {'micro_mAP':>9} {'macro_f1':>9} {'micro_f1':>9}"
        f" {'subset_acc':>10} {'labels/img':>10}"
    ]
    for split in ("val", "test"):
        s = m.get(split) or {}
        if not s.get("n"):
            lines.append(f"{split:<6} {0:>6}" + f" {'-':>9}" * 4 + f" {'-':>10}" * 2)
            continue
        lines.append(
            f"{split:<6} {s['n']:>6} {s['macro_map']:>9.4f} {s['micro_map']:>9.4f} {s['macro_f1']:>9.4f}"
            f" {s['micro_f1']:>9.4f} {s['subset_accuracy']:>10.4f} {s['label_cardinality']:>10.2f}"
        )
    test = m.get("test") or {}
    lines.append("")
    if test.get("n"):
        lines.append(
            f"test macro mAP: {test['macro_map']:.4f} (label-frequency baseline {test['map_baseline']:.4f})"
        )
    lines += [f"note: {note}" for note in m.get("notes", [])]
    return lines


def _new_run(cfg: Config, cache_path: Path, head: str) -> Path:
    from pipeline.utils.runs import new_run_dir

    return new_run_dir(runs_root(cfg, cache_path), head)


def _metrics(
    cfg: Config, cache, layer, params, fitted: Fitted, preds, scores, notes, run_dir: Path
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
    elif getattr(head_est, "n_iter_", None) is not None and (fitted.head.full_batch or not fitted.streamed):
        fit_info["n_iter"] = np.asarray(head_est.n_iter_).max().item()
    if fitted.head.streaming and fitted.head.kind == "sklearn" and not fitted.head.full_batch:
        fit_info["epochs"] = fitted.head.epochs
    counts = {s: int((cache.split == i).sum()) for i, s in enumerate(SPLITS)}
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
            "source": cache.meta.get("source"),
            "rows": counts,
            "state": cache_state(cache),  # the rows it was trained and scored on: stale once they change
        },
        "val": scores["val"],
        "test": scores["test"],
        "history": fitted.history,
        "notes": notes,
        "config": cfg.to_dict(),
    }


def _write_run(
    run_dir: Path, fitted: Fitted, metrics: dict[str, Any], preds: dict[str, Predictions], cache
) -> None:
    from pipeline.heads.persist import save_model
    from pipeline.utils.io import write_json
    from pipeline.utils.plots import plot_learning_curves, plot_split_confusions, write_misclassified
    from pipeline.utils.runs import METRICS, write_manifest

    kind, model_files = save_model(run_dir, fitted.model)
    plot_split_confusions(run_dir, metrics, cache.class_names)
    if fitted.history:
        plot_learning_curves(
            run_dir / "learning_curves.png", fitted.history, f"{metrics['head']} learning curves"
        )
    if cache.multilabel:
        write_json(run_dir / METRICS, metrics)
        write_manifest(run_dir, kind, model_files)
        return
    parts = []
    for split in ("test", "val"):
        p = preds[split]
        prob = p.proba[np.arange(len(p.rows)), p.y_pred] if len(p.rows) else np.zeros(0)
        parts.append((split, [cache.keys[int(r)] for r in p.rows], p.y_true, p.y_pred, prob))
    counts = write_misclassified(run_dir / "misclassified.csv", parts, cache.class_names)
    for split, n in counts.items():
        if metrics[split].get("n"):
            metrics[split]["misclassified"] = n
    write_json(run_dir / METRICS, metrics)
    write_manifest(run_dir, kind, model_files)
