"""Export an end-to-end model (a fine-tuned run, or a stage-2 run rebuilt) and prove each export.

Formats (``--format``, comma-separated):

==================  ===========================================  =============================================
format              file                                         input
==================  ===========================================  =============================================
``keras``           ``model.keras``                              N×H×W×3 float32 raw RGB 0..255, any size
``savedmodel``      ``saved_model/`` (endpoint ``serve``)        N×H×W×3 float32 raw RGB 0..255, any size
``tflite``          ``model.tflite`` (float32)                   N×S×S×3 float32 raw RGB 0..255
``tflite-dynamic``  ``model-dynamic.tflite`` (int8 weights)      N×S×S×3 float32 raw RGB 0..255
``tflite-int8``     ``model-int8.tflite`` (int8 weights and      N×S×S×3 float32 raw RGB 0..255
                    activations, float32 in/out)
``onnx``            ``model.onnx`` (opset 17, ONNX Runtime)      N×S×S×3 float32 raw RGB 0..255
``embedder``        ``embedder.tflite`` (float32; the backbone   N×S×S×3 float32 raw RGB 0..255
                    alone: out, the feature the cache holds)
==================  ===========================================  =============================================

Every TFLite file carries MediaPipe Tasks metadata (:mod:`pipeline.model.tasks_metadata`): the classifiers
load in MediaPipe's ``ImageClassifier`` as they are, ``embedder.tflite`` in its ``ImageEmbedder``; each
entry's ``metadata`` is what MediaPipe reads back from the written file. The embedder is checked by cosine
(``min_cosine``: against the Keras backbone; ``min_cosine_cache``: against the cached features of the same
images, which a stage-2 run's embedder must meet too). ``onnx`` needs ``featcache[onnx]``; a model the ONNX
converter refuses gets an ``error`` entry (the converter's reason) and the other formats still come out.

Preprocessing (and, for Keras/SavedModel, the shared resize) is inside every export: they take raw pixels.
TFLite has no builtin for the antialiased resize, so TFLite files take S×S images: read files with
:func:`pipeline.data.images.load_images` (``pipeline.load_images``: the decoder, ``data.decode`` policy and shared
resize extraction used; ``export.json`` records the ``image_size``, ``resize`` and ``decode`` to pass), or resize
arrays with :func:`pipeline.data.preprocess.resize_images` (an S×S image needs nothing: that resize is the identity).
The Keras and SavedModel files resize inside but take pixels, not files: to give them the pixels the run's
features came from, read files with ``load_images`` too (an S×S image goes through their resize unchanged).

Every export is checked twice: its outputs against the Keras model's on sample images (max |Δ probability|),
and its accuracy on the whole validation split next to the Keras model's. :data:`TOLERANCES` says what
passes; full-int8 calibrates on decoded *training* images drawn from the cache (``--calibration N``).

A multi-label run exports the same formats with one sigmoid probability per class; its ``export.json`` adds
``task: "multilabel"`` and the run's per-class ``thresholds`` (what predict reads), and each format is scored
by val macro mAP instead of accuracy (``macro_map``, ``keras_macro_map``, ``macro_map_delta``; tolerance
``map_drop``) plus ``same_labels``, the share of val images given the label set the Keras model gives.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features.tflite import TFLiteRunner
from pipeline.model.deploy import TFLITE_MODES, tflite_classifier, tflite_embedder
from pipeline.model.onnx_model import OnnxConversionError
from pipeline.model.tasks_metadata import available as metadata_available
from pipeline.stages.export.text import format_report  # noqa: F401 - the stage's report, as the CLI prints it
from pipeline.utils.config import MULTILABEL, Config, resolve_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, atomic_write
from pipeline.utils.runs import RunMetrics

FORMATS = ("keras", "savedmodel", "tflite", "tflite-dynamic", "tflite-int8", "onnx", "embedder")


FILES = {
    "keras": "model.keras",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
    "tflite-dynamic": "model-dynamic.tflite",
    "tflite-int8": "model-int8.tflite",
    "onnx": "model.onnx",
    "embedder": "embedder.tflite",
}


#: What an export must meet. ``max_abs_diff``: max |Δ probability| vs Keras on the sample images.
#: ``accuracy_drop``: Keras val accuracy − export val accuracy, at most this (or one val image, if more).
TOLERANCES: dict[str, dict[str, float]] = {
    "keras": {"max_abs_diff": 1e-6},
    "savedmodel": {"max_abs_diff": 1e-5},
    "tflite": {"max_abs_diff": 1e-4},
    "tflite-dynamic": {"accuracy_drop": 0.02},
    "tflite-int8": {"accuracy_drop": 0.05},
    "onnx": {"max_abs_diff": 1e-4},
    "embedder": {"min_cosine": 0.999},  # per image, against the Keras backbone (and the cache: stage-2 runs)
}

#: A multi-label run's tolerances: val macro mAP for accuracy, and the SavedModel's 1e-5 for the reloaded
#: ``.keras`` file too: its sigmoids sit near 0.5, where the float32 noise of a function traced for another
#: input shape (the raw-size check) is largest in absolute terms (measured: 1.5e-6 on the mosaics' test).
MULTILABEL_TOLERANCES: dict[str, dict[str, float]] = {
    **{f: {"map_drop": t["accuracy_drop"]} if "accuracy_drop" in t else t for f, t in TOLERANCES.items()},
    "keras": {"max_abs_diff": 1e-5},
}


SAMPLE_IMAGES = 16


def parse_formats(spec: str | list[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in items:
        f = raw.strip().lower()
        if not f:
            continue
        if f == "all":
            out += [x for x in FORMATS if x not in out]
            continue
        if f not in FORMATS:
            raise FeatcacheError(f"--format: unknown format {raw!r} (known: {', '.join(FORMATS)}, all)")
        if f not in out:
            out.append(f)
    if not out:
        raise FeatcacheError("--format: no format given")
    return out


@dataclass
class Exportable:
    """An end-to-end model plus what is needed to check it: its run's metrics and cache."""

    model: Any  # keras.Model, raw images (any size) → probabilities
    core: Any  # keras.Model, N×S×S×3 raw pixels → probabilities
    run_dir: Path
    kind: str  # "finetune" | "stage2"
    metrics: RunMetrics
    class_names: list[str]
    image_size: int
    resize: str
    cache_path: Path | None
    decode: str = "exact"  # the data.decode policy of the run's features (runs from before it: exact)
    thresholds: list[float] | None = None  # a multi-label run's per-class thresholds (None: single-label)

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    @property
    def score(self) -> str:
        """The val score each format is compared on: ``accuracy``, or ``macro_map`` (multi-label)."""
        return self.metrics.score_key


def load_exportable(run_dir: str | Path, trust_pickle: bool = False) -> Exportable:
    """A fine-tuned run's ``model.keras``, or a stage-2 run rebuilt end to end (verified by its manifest)."""
    from pipeline.utils.runs import read_metrics, verify_run

    run_dir = Path(run_dir)
    manifest = verify_run(run_dir)  # a folder that is no run answers before TensorFlow is imported
    metrics = read_metrics(run_dir)

    from pipeline.model.rebuild import rebuild, run_source
    from pipeline.model.runners import load_keras

    if manifest.get("kind") == "finetune":
        model = load_keras(run_dir / "model.keras")
        cache = metrics.cache_path
        return Exportable(
            model, model.get_layer("core"), run_dir, "finetune", metrics, metrics.class_names,
            int(metrics["image_size"]), str(metrics["resize"]), cache if cache and cache.is_file() else None,
            metrics.decode, metrics.thresholds if metrics.multilabel else None,
        )  # fmt: skip
    rb = rebuild(run_dir, trust_pickle=trust_pickle)
    src = run_source(metrics)
    return Exportable(
        rb.model,
        rb.core,
        run_dir,
        "stage2",
        metrics,
        rb.class_names,
        rb.image_size,
        rb.resize,
        src.cache_path,
        rb.decode,
        metrics.thresholds if metrics.multilabel else None,
    )


def _images(
    ds, samples, size: int, policy: str, batch_size: int = 32, *, decode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded + shared-resized S×S images (as extraction made them) and which ones could be read."""
    from pipeline.data.images import image_batches

    imgs = np.zeros((len(samples), size, size, 3), np.float32)
    ok_all = np.zeros(len(samples), bool)
    for idx, x, ok, _ in image_batches(ds, samples, size, policy, batch_size, decode=decode):
        imgs[idx.numpy()] = x.numpy()
        ok_all[idx.numpy()] = np.reshape(ok.numpy(), -1)
    return imgs, ok_all


def _accuracy(
    run, images: np.ndarray, labels: np.ndarray, batch: int = 64, src: Exportable | None = None
) -> tuple[float | None, np.ndarray]:
    """(accuracy, or a multi-label run's macro mAP, of ``run`` on ``images``; its probabilities)."""
    if not len(images):
        return None, np.zeros((0, 0))
    proba = np.concatenate([run(images[i : i + batch]) for i in range(0, len(images), batch)])
    if src is not None and src.multilabel:
        from pipeline.heads.metrics import macro_map

        return macro_map(labels, proba), proba
    return float((proba.argmax(1) == labels).mean()), proba


@dataclass
class _Evaluation:
    """What every format is checked on: the eval images, the Keras model's outputs on them, a few raw ones."""

    ds: Any
    train: Any
    split: str
    images: np.ndarray
    labels: np.ndarray
    raw_sample: list[np.ndarray]
    keras_run: Any
    keras_accuracy: float | None
    keras_proba: np.ndarray
    features: np.ndarray | None = None  # the cached features of ``images`` (the embedder's reference)

    @property
    def sample(self) -> np.ndarray:
        return self.images[:SAMPLE_IMAGES]


def export(
    run_dir: str | Path | None = None,
    formats: list[str] | str | None = None,
    out: str | Path | None = None,
    cfg: Config | str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write each format under ``out`` (default ``<run>/export``), check it, write ``export.json``; return it.

    ``run_dir`` is a run folder, id or id prefix (default ``export.run``, else the newest run of the cache
    ``cfg`` selects); ``formats``, ``out`` and the keywords (``calibration``, ``seed``, ``progress``,
    ``trust_pickle``, ...) override ``cfg`` as in every stage (:func:`pipeline.utils.config.resolve_config`).
    Like every stage, it also takes the config first: ``export(cfg)``, ``export("my.toml", out=...)``.
    """
    from pipeline.cache.locate import resolve_run
    from pipeline.utils.io import write_json

    if cfg is None and (isinstance(run_dir, Config) or str(run_dir or "").endswith(".toml")):
        cfg, run_dir = run_dir, None  # a run is a folder or an id, never a Config or a .toml file
    cfg = resolve_config(cfg, "export", run=run_dir, formats=formats, out=out, **options)
    formats = parse_formats(cfg.export.formats)
    run = resolve_run(cfg, cfg.export.run)
    src = load_exportable(run, cfg.security.trust_pickle)  # a folder that is no run fails here, cheaply
    if "onnx" in formats:
        from pipeline.model.onnx_model import require

        require("--format onnx")  # one line naming the extra, before anything is written
    if src.cache_path is None:
        raise FeatcacheError(f"the cache of {src.run_dir} is gone: export checks each format on its images")
    out = Path(cfg.export.out) if cfg.export.out else src.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: print(msg, flush=True)) if cfg.extract.progress else (lambda msg: None)
    ev = _evaluation(src, say)
    report: dict[str, Any] = {
        "run": str(src.run_dir.resolve()),
        "run_kind": src.kind,
        "class_names": src.class_names,
        "image_size": src.image_size,
        "resize": src.resize,
        "decode": src.decode,
        **_task(src),
        "eval_split": ev.split,
        "eval_images": int(len(ev.images)),
        "sample_images": int(len(ev.sample)),
        f"keras_{src.score}": ev.keras_accuracy,
        "tolerances": {f: (MULTILABEL_TOLERANCES if src.multilabel else TOLERANCES)[f] for f in formats},
        "formats": {},
    }
    rng = np.random.default_rng(cfg.train.seed)
    for fmt in formats:
        t0 = time.perf_counter()
        say(f"exporting {fmt} ...")
        path = out / FILES[fmt]
        try:
            run, raw_diff = _write_format(fmt, src, path, ev, cfg.export.calibration, rng)
            entry = (
                _check_embedder(path, run, ev, src)
                if fmt == "embedder"
                else _check(fmt, path, run, raw_diff, ev, src)
            )
        except OnnxConversionError as e:  # this backbone does not convert: say why, export the rest
            entry = {"path": None, "error": str(e), "ok": False}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report["formats"][fmt] = entry
    report["ok"] = all(e["ok"] for e in report["formats"].values())
    write_json(out / "export.json", report)
    return report


def _task(src: Exportable) -> dict[str, Any]:
    """A multi-label run's ``task`` and per-class ``thresholds`` for ``export.json`` ({} for single-label:
    its export.json stays as it was)."""
    if not src.multilabel:
        return {}
    return {"task": MULTILABEL, "thresholds": dict(zip(src.class_names, src.thresholds, strict=True))}


def _evaluation(src: Exportable, say) -> _Evaluation:
    """Read the eval split's images (val, else train) once and run the Keras model on them."""
    from pipeline.cache.store import FeatureCache
    from pipeline.data.images import split_images
    from pipeline.model.rebuild import cache_dataset

    with FeatureCache(src.cache_path) as cache:
        ds = cache_dataset(cache.meta)
        val = split_images(cache, ds, "val")
        train = split_images(cache, ds, "train")
        part, split = (val, "val") if len(val.rows) else (train, "train")
        say(f"reading {len(part.samples)} {split} images ...")
        images, ok = _images(ds, part.samples, src.image_size, src.resize, decode=src.decode)
        layer = src.metrics.layer
        feats = cache.features(layer, part.rows[ok]) if layer in cache.layers else None
    from pipeline.model.runners import keras_runner

    keras_run = keras_runner(src.model)
    acc, proba = _accuracy(keras_run, images[ok], part.labels[ok], src=src)
    raw = _raw_images(ds, part.samples[:3], src.image_size, src.decode)
    return _Evaluation(ds, train, split, images[ok], part.labels[ok], raw, keras_run, acc, proba, feats)


def _write_format(fmt: str, src: Exportable, path: Path, ev: _Evaluation, calibration: int, rng):
    """Write one format atomically; return a runner over the written file and its raw-size difference."""
    from pipeline.model.runners import keras_runner, load_keras, savedmodel_runner

    if fmt in ("keras", "savedmodel"):
        with atomic_path(path) as tmp:
            if fmt == "keras":
                src.model.save(tmp)
            else:
                src.model.export(str(tmp), format="tf_saved_model", verbose=False)
        run = keras_runner(load_keras(path)) if fmt == "keras" else savedmodel_runner(path)
        diffs = (float(np.abs(run(r[None]) - ev.keras_run(r[None])).max()) for r in ev.raw_sample)
        return run, max(diffs, default=None)
    if fmt == "onnx":
        from pipeline.model.onnx_model import OnnxRunner, to_onnx

        with atomic_path(path) as tmp:
            to_onnx(src.core, src.image_size, tmp)
        return OnnxRunner(path), None
    if fmt == "embedder":
        atomic_write(path, tflite_embedder(src.core, src.image_size))
        return TFLiteRunner(path), None
    mode = TFLITE_MODES[fmt]
    rep = _representative(ev.ds, ev.train, src, calibration, rng) if mode == "int8" else None
    atomic_write(
        path, tflite_classifier(src.core, src.image_size, mode, src.class_names, src.multilabel, rep)
    )
    return TFLiteRunner(path), None


def _check(fmt: str, path: Path, run, raw_diff, ev: _Evaluation, src: Exportable) -> dict[str, Any]:
    """One format's entry in ``export.json``: its outputs and accuracy (multi-label: macro mAP and label
    sets) against the Keras model's."""
    S, score = src.image_size, src.score
    acc, proba = _accuracy(run, ev.images, ev.labels, src=src)
    sample = ev.sample
    diff = float(np.abs(run(sample) - ev.keras_proba[: len(sample)]).max()) if len(sample) else None
    entry = {
        "path": str(path),
        "bytes": _size(path),
        "input": "N×H×W×3 float32 raw RGB 0..255, any size"
        if fmt in ("keras", "savedmodel")
        else f"N×{S}×{S}×3 float32 raw RGB 0..255 (read files with pipeline.load_images, see export.json)",
        "max_abs_diff": diff,
        "max_abs_diff_raw_size": raw_diff,
        score: acc,
        f"keras_{score}": ev.keras_accuracy,
        f"{score}_delta": None if acc is None or ev.keras_accuracy is None else acc - ev.keras_accuracy,
    }
    if src.multilabel and len(ev.images):
        from pipeline.heads.multilabel import above

        same = above(proba, src.thresholds) == above(ev.keras_proba, src.thresholds)
        entry["same_labels"] = float(np.all(same, axis=1).mean())
    entry["ok"] = _passes(fmt, entry, len(ev.images), src.multilabel)
    if fmt in TFLITE_MODES:
        entry["metadata"] = _metadata(path)
        labelled = (entry["metadata"] or {}).get("labels") == len(src.class_names)
        entry["ok"] = entry["ok"] and (labelled or not metadata_available())
    return entry


def _metadata(path: Path) -> dict[str, Any] | None:
    """The MediaPipe metadata of a written TFLite file, as MediaPipe's own reader reads it back."""
    from pipeline.model.tasks_metadata import read_metadata, summary

    return summary(read_metadata(path.read_bytes())) if metadata_available() else None


def _check_embedder(path: Path, run, ev: _Evaluation, src: Exportable) -> dict[str, Any]:
    """The embedder's entry: per-image cosine of its features to the Keras backbone's and to the cache's."""
    from pipeline.model.deploy import embedder_cosines

    S, dims = src.image_size, run.output_shape[next(iter(run.output_shape))][-1]
    entry = {
        "path": str(path),
        "bytes": _size(path),
        "input": f"N×{S}×{S}×3 float32 raw RGB 0..255 (read files with pipeline.load_images, see export.json)",
        "output": f"N×{dims} float32: the backbone's pooled feature (what the cache holds)",
        **embedder_cosines(run, src.core, ev.images, ev.features),
        "metadata": _metadata(path),
    }
    tol = TOLERANCES["embedder"]["min_cosine"]
    checked = [entry["min_cosine"]] + ([entry["min_cosine_cache"]] if src.kind == "stage2" else [])
    has_metadata = entry["metadata"] is not None or not metadata_available()
    entry["ok"] = all(c is None or c >= tol for c in checked) and has_metadata
    return entry


def _passes(fmt: str, e: dict[str, Any], n: int, multilabel: bool = False) -> bool:
    tol = (MULTILABEL_TOLERANCES if multilabel else TOLERANCES)[fmt]
    if "max_abs_diff" in tol:
        diffs = [d for d in (e["max_abs_diff"], e["max_abs_diff_raw_size"]) if d is not None]
        return all(d <= tol["max_abs_diff"] for d in diffs)
    delta, drop = ("macro_map_delta", "map_drop") if multilabel else ("accuracy_delta", "accuracy_drop")
    if e[delta] is None:
        return True
    allowed = (tol[drop] if multilabel else max(tol[drop], 1.0 / max(n, 1))) + 1e-9
    return -e[delta] <= allowed


def _raw_images(ds, samples, size: int, decode: str) -> list[np.ndarray]:
    """A few images at their decoded size (decoded as extraction decodes them: same ``data.decode`` policy)."""
    from pipeline.data.decode import decode_image, decode_request
    from pipeline.data.images import to_rgb

    request = decode_request(size, decode)
    out = []
    for s in samples:
        with contextlib.suppress(Exception):
            raw = ds.read(s)
            img = decode_image(raw, reduce_to=request) if isinstance(raw, bytes) else to_rgb(raw)
            out.append(np.asarray(img, np.float32))
    return out


def _representative(ds, train, src: Exportable, n: int, rng):
    """Calibration for full int8: ``n`` decoded training images drawn at random from the cache's train rows."""
    pick = (
        rng.choice(len(train.samples), size=min(n, len(train.samples)), replace=False)
        if len(train.samples)
        else []
    )
    chosen = [train.samples[int(i)] for i in pick]
    images, ok = _images(ds, chosen, src.image_size, src.resize, decode=src.decode)
    images = images[ok]
    if not len(images):
        raise FeatcacheError("tflite-int8: no readable training images to calibrate on")

    def gen():
        for img in images:
            yield [img[None]]

    return gen


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
