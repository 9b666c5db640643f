"""Stage 3: fine-tune a rebuilt end-to-end model on the images, resumably.

    stage-2 run ─► rebuild (exact) ─► freeze: BatchNorm always, backbone except the top N layers (or all)
               ─► recompile (Adam, low learning rate) ─► epochs on augmented images, val each epoch
               ─► checkpoint every epoch (weights + optimizer + epoch, atomically) ─► best-on-val weights
               ─► model.keras + metrics.json (before/after, stage-2 format) + plots + manifest.json

The run folder is ``<runs>/finetune/<source run>-ft-<unfreeze>-<hash>/``, the hash covering every setting
that changes the result, so rerunning the same command finds the same folder: an interrupted run (Ctrl-C,
``kill -9``, a crash) resumes from its last finished epoch, and a finished one is reported without work.
Images are read exactly as extraction read them (:func:`pipeline.data.images.make_image_dataset`).
The model's side (unfreezing, compiling, evaluating, checkpointing) is :mod:`pipeline.model.finetuning`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.locate import resolve_run
from pipeline.data.images import SplitImages, split_images
from pipeline.model.finetuning import (
    Checkpoint,
    compile_model,
    evaluate,
    labelled_dataset,
    loss_and_hits,
    parse_unfreeze,
    rechoose_thresholds,
    score_split,
    set_trainable,
    stage2_thresholds,
    task_fields,
)
from pipeline.utils.config import SPLITS, Config, resolve_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, file_lock
from pipeline.utils.runs import RunMetrics, finished_runs, read_metrics

FORMAT = 2  # bump when the checkpoint layout or the recipe changes


@dataclass
class FinetuneRun:
    run_dir: Path
    metrics: dict[str, Any]
    already_done: bool = False
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        m = self.metrics
        ft = m["finetune"]
        eq = m.get("equivalence") or {}
        key = RunMetrics(m).score_key
        lines = [
            f"fine-tuned {m['source_run']} · unfreeze {ft['unfreeze']} ({len(ft['unfrozen_layers'])} backbone layers,"
            f" {ft['trainable_params']:,} trainable params) · Adam {ft['learning_rate']:g}",
            f"epochs: {m['fit']['epochs']} (best {m['fit'].get('best_epoch') or '-'})"
            + (" · stopped early" if m["fit"].get("stopped_early") else "")
            + (f" · resumed after epoch {self.resumed_from}" if self.resumed_from else "")
            + f" · train {m['fit']['train_seconds']:.1f} s · total {m['fit']['seconds']:.1f} s",
            "",
            f"{'split':<6} {'n':>6} {'before':>9} {'after':>9}   ({key.replace('_map', ' mAP')})",
        ]
        for split in ("val", "test"):
            b, a = m["before"].get(split) or {}, m.get(split) or {}
            if not a.get("n"):
                lines.append(f"{split:<6} {0:>6} {'-':>9} {'-':>9}")
                continue
            lines.append(f"{split:<6} {a['n']:>6} {b.get(key, float('nan')):>9.4f} {a[key]:>9.4f}")
        if eq.get("max_abs_diff") is not None:
            lines.append("")
            lines.append(
                f"before fine-tuning, end to end vs stage 2 on {eq['n']} val images: max |Δ probability| {eq['max_abs_diff']:.2e}"
            )
        for note in self.notes + m.get("notes", []):
            lines.append(f"note: {note}")
        if self.already_done:
            lines.append(
                "already finished (same settings); delete the folder or change a setting to train again"
            )
        lines.append(f"run: {self.run_dir}")
        return "\n".join(lines)


def finetune_dir(source: Path, cfg: Config) -> Path:
    """Same source run + same settings → same folder: what makes rerunning the command resume it."""
    from pipeline.utils.io import sha256_file

    f = cfg.finetune
    settings = {
        "format": FORMAT,
        "source": source.resolve().name,
        "source_manifest": sha256_file(source / "manifest.json")
        if (source / "manifest.json").is_file()
        else "",
        "unfreeze": f.unfreeze.strip().lower(),
        "learning_rate": float(f.learning_rate),
        "epochs": int(f.epochs),
        "batch_size": int(f.batch_size),
        "patience": int(f.patience),
        "augment": [a.strip().lower() for a in f.augment],
        "seed": int(cfg.train.seed),
        "keep_worse": bool(f.keep_worse),
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    tag = settings["unfreeze"].replace(":", "")
    return source.resolve().parent / "finetune" / f"{source.resolve().name}-ft-{tag}-{h}"


def finetune(cfg: Config | str | Path | None = None, **options: Any) -> FinetuneRun:
    """Fine-tune the head of a stage-2 run (``finetune.run``, ``run=``; default the latest) end to end;
    resumable, see the module docstring. Keywords override ``cfg`` as in every stage
    (:func:`pipeline.utils.config.resolve_config`)."""
    cfg = resolve_config(cfg, "finetune", **options)
    parse_unfreeze(cfg.finetune.unfreeze)
    from pipeline.data.augment import augmentation_layers

    augmentation_layers(cfg.finetune.augment)  # unknown names fail before any work
    tensorboard_available(cfg)
    source = resolve_run(cfg, cfg.finetune.run, finetuned=False)
    check_convertible(source)
    run_dir = finetune_dir(source, cfg)
    if (run_dir / "manifest.json").is_file():
        return FinetuneRun(run_dir, read_metrics(run_dir), already_done=True)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(str(run_dir) + ".lock", f"{run_dir}: another featcache finetune is running on it"):
            return _finetune(cfg, source, run_dir)
    except KeyboardInterrupt:
        raise FeatcacheError(
            f"interrupted: finished epochs are kept in {run_dir / 'checkpoint'}; run the same command again to resume"
        ) from None
    except FeatcacheError:
        if created:
            remove_if_empty(run_dir)  # a refused run leaves nothing behind
        raise


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` and its sub-folders if no file was written in them."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def check_convertible(source: Path) -> None:
    """Refuse a run whose head cannot become Keras layers before any work, naming the best one that can."""
    from pipeline.heads.registry import convertible_head

    m = read_metrics(source, missing_ok=True)
    if not m.head or convertible_head(str(m.head)):
        return
    cache = m.cache_path
    runs = finished_runs(source.parent, cache, finetuned=False) if cache is not None else []
    scored = [
        (float(r.val_accuracy or 0.0), path)
        for path in runs
        if convertible_head(str((r := read_metrics(path, missing_ok=True)).head))
    ]
    if scored:
        acc, best = max(scored, key=lambda t: t[0])
        hint = f"the best run that can is {best.name} (val accuracy {acc:.4f}): featcache finetune --run {best.name}"
    else:
        hint = "no run of this cache can: train one with --head logistic (or search --convertible)"
    raise FeatcacheError(
        f"run {source.name}: head {m.head!r} cannot be converted into Keras layers, so it cannot be fine-tuned"
        f" or exported; {hint}"
    )


def _finetune(cfg: Config, source: Path, run_dir: Path) -> FinetuneRun:
    import keras

    from pipeline.cache.state import cache_state
    from pipeline.cache.store import FeatureCache
    from pipeline.model.rebuild import cache_dataset, rebuild

    t_start = time.perf_counter()
    f = cfg.finetune
    keras.utils.set_random_seed(int(cfg.train.seed))
    rb = rebuild(source, augment=f.augment, trust_pickle=cfg.security.trust_pickle)
    if rb.source.cache_path is None:
        raise FeatcacheError(f"the cache of {source} is gone: fine-tuning needs its split and its images")
    trainable = set_trainable(rb, f.unfreeze)
    compile_model(rb, f.learning_rate)
    ckpt = Checkpoint(run_dir)
    state = ckpt.load()
    notes: list[str] = []
    with FeatureCache(rb.source.cache_path) as cache:
        ds = cache_dataset(cache.meta)
        parts = {s: split_images(cache, ds, s) for s in SPLITS}
        val_X = cache.features(rb.source.layer, parts["val"].rows) if len(parts["val"].rows) else None
        train0 = _train_epoch0(cache, rb, parts["train"]) if state is None else None
        scored_on = cache_state(cache)
    if not len(parts["train"].rows):
        raise FeatcacheError("no training images: the cache's train split is empty or its images are gone")

    resumed_from = 0
    if state is None:  # before: the rebuilt model end to end, and its equivalence with stage 2
        state = _initial_state(rb, ds, parts, val_X, int(f.batch_size), t_start)
        state["epoch0"] = {**(train0 or {}), **state["epoch0"]}
        if not f.keep_worse and "val_loss" in state["epoch0"]:  # an epoch must beat the model as it is
            state["best_val_loss"] = state["epoch0"]["val_loss"]
        ckpt.write_state(state)
    else:
        resumed_from = int(state["epoch"])
        if resumed_from:
            ckpt.restore(state, rb.train_model)
        print(f"resuming {run_dir.name} after epoch {resumed_from} of {f.epochs}", file=sys.stderr)
    if not len(parts["val"].rows):
        notes.append("the val split is empty: no early stopping, the last epoch is kept")
    _train_epochs(cfg, rb, ds, parts, state, ckpt)

    t_after = time.perf_counter()
    if _kept_before(cfg, state, len(parts["val"].rows) > 0):
        e0 = state["epoch0"]
        notes.append(
            f"no epoch beat the model before fine-tuning on val (loss {e0['val_loss']:.4f}, accuracy"
            f" {e0['val_accuracy']:.4f}): kept that model (finetune.keep_worse=true keeps the best epoch)"
        )
        state["best_epoch"] = 0
        rb = rebuild(
            source, trust_pickle=cfg.security.trust_pickle
        )  # exactly the model before fine-tuning (the conversion is exact)
    elif state.get("best_weights"):
        rb.train_model.load_weights(str(ckpt.dir / state["best_weights"]))
    bs = int(f.batch_size)
    after_val, p_val, ok_val = evaluate(rb.model, ds, parts["val"], rb, bs, True, stage2_thresholds(rb))
    thresholds = rechoose_thresholds(rb, parts["val"], p_val, ok_val, notes)
    if thresholds is not None:  # a multi-label run's thresholds, chosen again on val for the new model
        after_val = score_split(parts["val"], p_val, ok_val, rb, True, thresholds)
    after_test, p_test, ok_test = evaluate(rb.model, ds, parts["test"], rb, bs, True, thresholds)
    state["thresholds"] = None if thresholds is None else [float(t) for t in thresholds]
    state["after_seconds"] = time.perf_counter() - t_after
    metrics = _record(cfg, rb, source, run_dir, state, trainable, after_val, after_test, notes, t_start)
    rows = {s: v["n"] for s, v in scored_on.items()}
    metrics["cache"] = {**(metrics["cache"] or {}), "rows": rows, "state": scored_on}  # this run's data
    scored = {"test": (parts["test"], p_test, ok_test), "val": (parts["val"], p_val, ok_val)}
    _write(run_dir, rb, metrics, scored, cache_keys(rb))
    ckpt.remove()
    return FinetuneRun(run_dir, metrics, resumed_from=resumed_from)


def _kept_before(cfg: Config, state: dict[str, Any], has_val: bool) -> bool:
    """True when the model before fine-tuning stays: no epoch had a lower val loss without a lower val
    accuracy (``finetune.keep_worse`` turns the comparison off)."""
    e0 = state.get("epoch0") or {}
    if cfg.finetune.keep_worse or not has_val or "val_loss" not in e0:
        return False
    return not state.get("best_epoch")


def _train_epoch0(cache, rb, part: SplitImages, chunk: int = 4096) -> dict[str, float]:
    """The rebuilt model's train loss and accuracy before any epoch, from the cached features (it equals
    the stage-2 head on them), read in chunks: the learning curves' epoch 0."""
    from pipeline.model.convert import stage2_scores

    loss = hits = 0.0
    decisions = 0
    rows = np.sort(np.asarray(part.rows))
    if not len(rows):
        return {}
    labels = cache.labels
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        p, _ = stage2_scores(rb.pipeline, cache.features(rb.source.layer, r), rb.n_classes, rb.multilabel)
        chunk_loss, chunk_hits, n = loss_and_hits(p, labels[r])
        loss += chunk_loss * len(r)
        hits += chunk_hits
        decisions += n
    return {"loss": loss / len(rows), "accuracy": hits / decisions}


def _initial_state(rb, ds, parts, val_X, bs: int, t_start: float) -> dict[str, Any]:
    """The checkpoint state before epoch 1: the rebuilt model's metrics and its equivalence with stage 2."""
    from pipeline.model.convert import stage2_scores

    t0 = stage2_thresholds(rb)
    before_val, p_val, ok_val = evaluate(rb.model, ds, parts["val"], rb, bs, rb.calibrated, t0)
    before_test, _, _ = evaluate(rb.model, ds, parts["test"], rb, bs, rb.calibrated, t0)
    eq = {"split": "val", "n": 0, "max_abs_diff": None}
    if val_X is not None and ok_val.any():
        want, _ = stage2_scores(rb.pipeline, val_X, rb.n_classes, rb.multilabel)
        eq = {
            "split": "val",
            "n": int(ok_val.sum()),
            "max_abs_diff": float(np.abs(p_val[ok_val] - want[ok_val]).max()),
        }
    return {
        "format": FORMAT,
        "epoch": 0,
        "history": {},
        "best_val_loss": None,
        "best_epoch": 0,
        "wait": 0,
        "stopped_early": False,
        "train_seconds": 0.0,
        "epoch_seconds": [],
        "before": {"val": before_val, "test": before_test},
        "epoch0": _val_epoch0(p_val, ok_val, parts["val"]),
        "equivalence": eq,
        "before_seconds": time.perf_counter() - t_start,
    }


def _val_epoch0(p_val: np.ndarray, ok: np.ndarray, part: SplitImages) -> dict[str, float]:
    if not ok.any():
        return {}
    loss, hits, n = loss_and_hits(p_val[ok], part.labels[ok])
    return {"val_loss": loss, "val_accuracy": hits / n}


def _train_epochs(cfg: Config, rb, ds, parts, state: dict[str, Any], ckpt: Checkpoint) -> None:
    """Epochs until ``finetune.epochs`` or early stopping; each one checkpointed as it ends."""
    f, bs = cfg.finetune, int(cfg.finetune.batch_size)
    has_val = len(parts["val"].rows) > 0
    read = {"size": rb.image_size, "policy": rb.resize, "batch_size": bs, "decode": rb.decode}
    val_ds = labelled_dataset(ds, parts["val"], shuffle_seed=None, **read) if has_val else None
    while state["epoch"] < f.epochs and not state["stopped_early"]:
        e = state["epoch"]
        train_ds = labelled_dataset(ds, parts["train"], shuffle_seed=int(cfg.train.seed) + e, **read)
        t0 = time.perf_counter()
        h = rb.train_model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=e + 1,
            initial_epoch=e,
            shuffle=False,
            verbose=0,
            callbacks=tensorboard_callbacks(cfg, ckpt.dir.parent),
        ).history
        dt = time.perf_counter() - t0
        if cfg.extract.progress:
            shown = " · ".join(f"{k} {v[-1]:.4f}" for k, v in h.items())
            print(f"epoch {e + 1}/{f.epochs}: {shown} · {dt:.1f} s", file=sys.stderr, flush=True)
        for k, v in h.items():
            state["history"].setdefault(k, []).append(float(v[-1]))
        state["epoch"] = e + 1
        state["train_seconds"] += dt
        state["epoch_seconds"].append(round(dt, 3))
        improved = True
        if has_val:
            vl = float(h["val_loss"][-1])
            improved = state["best_val_loss"] is None or vl < state["best_val_loss"]
            acc0 = (state.get("epoch0") or {}).get("val_accuracy")
            if acc0 is not None and not f.keep_worse and "val_accuracy" in h:
                # no worse on accuracy, compared at Keras's float32 (an equal share must not lose to its
                # float64 copy: 0.76136362 < 0.76136364)
                improved = improved and np.float32(h["val_accuracy"][-1]) >= np.float32(acc0)
            if improved:
                state["best_val_loss"], state["best_epoch"], state["wait"] = vl, e + 1, 0
            else:
                state["wait"] += 1
                if f.patience > 0 and state["wait"] >= f.patience and e + 1 < f.epochs:
                    state["stopped_early"] = True
        else:
            state["best_epoch"] = e + 1
        ckpt.save_epoch(state, rb.train_model, improved)


def tensorboard_available(cfg: Config) -> None:
    """``finetune.tensorboard`` needs the ``tensorboard`` package (tf.summary's writer): say so before any work."""
    import importlib.util

    if cfg.finetune.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise FeatcacheError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or featcache[tensorboard])"
        )


def tensorboard_callbacks(cfg: Config, run_dir: Path) -> list:
    """Keras' own TensorBoard callback when ``finetune.tensorboard`` is on: ``<run>/tensorboard/{train,validation}``,
    one point per epoch (epoch numbers continue across resumed processes)."""
    if not cfg.finetune.tensorboard:
        return []
    import keras

    return [keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), write_graph=False)]


def cache_keys(rb) -> list[str]:
    from pipeline.cache.store import FeatureCache

    with FeatureCache(rb.source.cache_path) as c:
        return list(c.keys)


def _record(
    cfg, rb, source, run_dir, state, trainable, after_val, after_test, notes, t_start
) -> dict[str, Any]:
    src = rb.metrics
    history = state["history"]
    return {
        "run_id": run_dir.name,
        "kind": "finetune",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source_run": str(source.resolve()),
        "head": src.get("head"),
        "head_kind": src.get("head_kind"),
        "params": src.get("params"),
        "layer": rb.source.layer,
        "transforms": src.get("transforms"),
        "class_names": rb.class_names,
        "n_features": src.get("n_features"),
        "probabilities": "sigmoid per class (fine-tuned end to end with binary cross-entropy)"
        if rb.multilabel else "softmax (fine-tuned end to end with log loss)",
        **task_fields(rb, state["thresholds"]),
        "image_size": rb.image_size,
        "resize": rb.resize,
        "decode": rb.decode,
        "cache": src.get("cache"),
        "finetune": {
            **trainable,
            "learning_rate": float(cfg.finetune.learning_rate),
            "optimizer": "Adam",
            "epochs": int(cfg.finetune.epochs),
            "batch_size": int(cfg.finetune.batch_size),
            "patience": int(cfg.finetune.patience),
            "augment": list(cfg.finetune.augment),
        },
        "fit": {
            "epochs": int(state["epoch"]),
            "best_epoch": int(state["best_epoch"]) or None,
            "stopped_early": bool(state["stopped_early"]),
            "train_seconds": round(float(state["train_seconds"]), 3),
            "epoch_seconds": state["epoch_seconds"],
            # rebuild + before-metrics + epochs + after-metrics, summed over resumed processes
            "seconds": round(float(state["before_seconds"]) + float(state["train_seconds"]) + float(state["after_seconds"]), 3),
            "wall_seconds_this_process": round(time.perf_counter() - t_start, 3),
        },
        "head_alone": {"fit_seconds": (src.get("fit") or {}).get("seconds"), "val": _acc(src.get("val"), rb),
                       "test": _acc(src.get("test"), rb)},
        "equivalence": state["equivalence"],
        "before": state["before"],
        "val": after_val,
        "test": after_test,
        "history": history,
        "history_epoch0": state.get("epoch0") or {},  # the rebuilt model, before any epoch
        "kept_before": not state.get("best_epoch") and bool(state.get("epoch0")) and not cfg.finetune.keep_worse,
        "notes": notes,
        "config": cfg.to_dict(),
    }  # fmt: skip


def _acc(split: dict | None, rb=None):
    """A split's headline score: accuracy, or a multi-label run's macro mAP."""
    return (split or {}).get(rb.metrics.score_key if rb is not None else "accuracy")


def _write(run_dir: Path, rb, metrics, scored: dict, keys: list[str]) -> None:
    """The run's files; ``scored``: split → (its images, probabilities, readable mask), test then val."""
    from pipeline.utils.io import write_json
    from pipeline.utils.plots import plot_learning_curves, plot_split_confusions, write_misclassified
    from pipeline.utils.runs import write_manifest

    with atomic_path(run_dir / "model.keras") as tmp:
        rb.model.save(tmp)
    plot_split_confusions(run_dir, metrics, rb.class_names, "fine-tuned ")
    if metrics["history"].get("loss"):
        plot_learning_curves(
            run_dir / "learning_curves.png",
            metrics["history"],
            "fine-tuning learning curves",
            epoch0=metrics.get("history_epoch0"),
        )
    if not rb.multilabel:  # misclassified.csv: single-label runs
        rows = []
        for split, (part, p, ok) in scored.items():
            y_pred = p[ok].argmax(1)
            prob = p[ok][np.arange(len(y_pred)), y_pred]
            rows.append((split, [keys[int(r)] for r in part.rows[ok]], part.labels[ok], y_pred, prob))
        counts = write_misclassified(run_dir / "misclassified.csv", rows, rb.class_names)
        for split, n in counts.items():
            if (metrics.get(split) or {}).get("n"):
                metrics[split]["misclassified"] = n
    write_json(run_dir / "metrics.json", metrics)
    write_manifest(run_dir, "finetune", ["model.keras"])
