"""``featcache predict``: top-k classes of images, from a stage-2 run or an end-to-end model.

Models (``--model``):

* a stage-2 run folder: the image's content digest is looked up in the run's cache (its features are read
  from there), else the features are computed by the same backbone, cut and pooling; then the fitted head.
  Any head works, including those that cannot be exported (kNN, gradient boosting).
* a fine-tuned run folder (``<runs>/finetune/<id>``), or an exported ``.keras`` file, ``saved_model/``
  folder, ``.tflite`` file or ``.onnx`` file (ONNX Runtime: ``featcache[onnx]``); class names from
  ``export.json`` or ``metrics.json`` beside it, and a multi-label model's per-class thresholds too, so it
  prints the labels above them as a stage-2 run does.

Images are decoded and resized exactly as extraction does (:func:`pipeline.data.images.make_image_dataset`),
with the ``data.decode`` policy of the model's features: the run's cache, or ``decode`` in the ``metrics.json`` /
``export.json`` beside a model file (``exact`` when neither says: models from before the policy).
A path that does not exist is an error before any work; an image that cannot be decoded gets an error row
and makes the command exit with status 2 after printing the rest.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.images import expand_inputs, path_dataset
from pipeline.model.sidecars import class_names_near, decode_near, export_info, thresholds_near
from pipeline.utils.config import Config, resolve_config
from pipeline.utils.errors import FeatcacheError


@dataclass
class ImageResult:
    image: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (class index, name, probability)
    source: str = ""  # cache | computed | model
    error: str | None = None
    labels: list[tuple[int, str, float]] | None = None  # a multi-label run's classes above their thresholds
    novelty: float | None = None  # 1 - cosine to the nearest train row of the run's cache (stage-2 runs)
    novel: bool | None = None  # novelty above the run's threshold (None: the run recorded none)


@dataclass
class Predictor:
    kind: str  # stage2 | keras | savedmodel | tflite | onnx
    class_names: list[str]
    image_size: int
    resize: str
    path: Path
    predict: Any = None  # (paths, samples, ds) → (proba N×C, ok, why, sources)
    decode: str = "exact"  # the data.decode policy images are read with (that of the model's features)
    thresholds: list[float] | None = None  # a multi-label run's decision threshold per class


def load_predictor(
    model: str | Path, batch_size: int = 32, cfg=None, cluster: str = "", trust_pickle: bool = False
) -> Predictor:
    """A predictor for a run folder, a run id (under ``cfg``'s runs folder), or an exported model file.

    ``cluster`` (a ``--cluster`` address) computes a stage-2 run's missing features on Dask workers.
    A 0.1 run's pickles load only with ``trust_pickle`` (or ``security.trust_pickle`` in ``cfg``).
    """
    path = model_path(model, cfg)
    check_model_kind(path)
    is_run = path.is_dir() and (path / "manifest.json").is_file()
    if is_run:
        from pipeline.utils.runs import verify_run

        if verify_run(path).get("kind") != "finetune":
            trust = trust_pickle or bool(cfg is not None and cfg.security.trust_pickle)
            return _stage2_predictor(path, batch_size, cluster, trust, cfg)
    if cluster:
        raise FeatcacheError(
            f"--cluster: predict runs on a cluster with a stage-2 run (features on the workers, the head "
            f"here); {path} is an end-to-end model: run it without --cluster"
        )
    if is_run:
        return _keras_predictor(path / "model.keras", batch_size, names_from=path / "metrics.json")
    if path.is_dir():
        return _savedmodel_predictor(path, batch_size)
    if path.suffix == ".keras":
        return _keras_predictor(path, batch_size)
    if path.suffix == ".onnx":
        return _onnx_predictor(path, batch_size)
    return _tflite_predictor(path, batch_size)


#: The model files ``--model`` takes, by suffix.
MODEL_FILES = (".keras", ".tflite", ".onnx")


def check_model_kind(path: Path) -> str:
    """Which kind of model ``path`` is (run | savedmodel | keras | tflite | onnx), before anything heavy
    loads."""
    if path.is_dir() and (path / "manifest.json").is_file():
        return "run"
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "savedmodel"
    if path.is_file() and path.suffix in MODEL_FILES:
        return path.suffix[1:]
    what = "an unfinished run (no manifest.json)" if (path / "metrics.json").is_file() else "not a model"
    raise FeatcacheError(
        f"--model {path}: {what}; expected a run folder or id, a .keras file, a SavedModel folder,"
        " a .tflite file or an .onnx file"
    )


def model_path(model: str | Path, cfg=None) -> Path:
    """``--model`` as a path: an existing file or folder, else a run id or id prefix under the runs folder
    ``cfg`` names (:func:`pipeline.cache.locate.resolve_run`)."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    if "/" in str(model) or "\\" in str(model) or path.suffix in MODEL_FILES:  # a path, not an id
        raise FeatcacheError(f"--model: not found: {model} (neither a file, a folder nor a run id)")
    from pipeline.cache.locate import resolve_run
    from pipeline.utils.config import load_config

    return resolve_run(cfg if cfg is not None else load_config(None), str(model)).resolve()


def _batched(ds, samples, p: Predictor, batch_size: int, run):
    """(proba, ok, why) of an end-to-end model ``run`` on images read with ``p``'s size, resize and decode."""
    from pipeline.model.image_features import read_batches

    return read_batches(ds, samples, p.image_size, p.resize, p.decode, batch_size, run)


def _keras_predictor(path: Path, batch_size: int, names_from: Path | None = None) -> Predictor:
    from pipeline.model.runners import keras_runner, load_keras, model_input

    model = load_keras(path)
    size, policy = model_input(model)
    if size is None:
        raise FeatcacheError(f"{path}: not a featcache model (no input size)")
    n = int(model.outputs[0].shape[-1])
    names = class_names_near(names_from or path, n)
    run = keras_runner(model)
    p = Predictor("keras", names, size, policy, path, decode=decode_near(names_from or path))
    p.thresholds = thresholds_near(names_from or path, names)  # a multi-label model's, from its sidecar
    p.predict = lambda ds, samples: (*_batched(ds, samples, p, batch_size, run), "model")
    return p


def _savedmodel_predictor(path: Path, batch_size: int) -> Predictor:
    from pipeline.model.runners import savedmodel_runner

    info = export_info(path)
    if not info.image_size or info.class_names is None:
        raise FeatcacheError(
            f"{path}: no export.json with image_size and class_names beside it (needed for the input size "
            "and the class names)"
        )
    run = savedmodel_runner(path)
    size, policy = info.image_size, info.resize
    p = Predictor("savedmodel", info.class_names, size, policy, path, decode=decode_near(path))
    p.thresholds = info.thresholds
    p.predict = lambda ds, samples: (*_batched(ds, samples, p, batch_size, run), "model")
    return p


def _tflite_predictor(path: Path, batch_size: int) -> Predictor:
    from pipeline.features.tflite import TFLiteRunner

    run = TFLiteRunner(path)
    return _file_predictor("tflite", path, run, run.n_outputs, batch_size)


def _onnx_predictor(path: Path, batch_size: int) -> Predictor:
    """An ``.onnx`` file (``featcache export --format onnx``) in ONNX Runtime; without the extra, one line
    naming it. Its input is S×S, as a TFLite file's: images are decoded and resized as extraction does."""
    from pipeline.model.onnx_model import OnnxRunner

    run = OnnxRunner(path)
    n = run.n_outputs or len(export_info(path).class_names or [])
    return _file_predictor("onnx", path, run, n, batch_size)


def _file_predictor(kind: str, path: Path, run, n: int, batch_size: int) -> Predictor:
    """A predictor over an S×S model file (TFLite, ONNX): class names and thresholds from its export.json."""
    info = export_info(path)
    size, policy = run.image_size, info.resize
    names = info.class_names if len(info.class_names or []) == n else [str(i) for i in range(n)]
    p = Predictor(kind, names, size, policy, path, decode=decode_near(path))
    if info.thresholds is not None and len(info.thresholds) != n:
        raise FeatcacheError(
            f"{path}: its export.json has {len(info.thresholds)} class thresholds, the model has {n} outputs;"
            " the sidecar does not match the model"
        )
    p.thresholds = info.thresholds
    p.predict = lambda ds, samples: (*_batched(ds, samples, p, batch_size, run), "model")
    return p


def _stage2_predictor(
    run_dir: Path, batch_size: int, cluster: str, trust_pickle: bool, cfg=None
) -> Predictor:
    from pipeline.heads.persist import load_run
    from pipeline.model.convert import stage2_scores
    from pipeline.model.rebuild import run_source

    loaded = load_run(run_dir, trust_pickle=trust_pickle)
    metrics = loaded.metrics
    src = run_source(metrics)
    names = metrics.class_names
    p = Predictor("stage2", names, src.image_size, src.resize, run_dir, decode=src.decode)
    if metrics.multilabel:
        p.thresholds = metrics.thresholds

    def predict(ds, samples):
        from pipeline.model.image_features import source_features

        X, ok, why, sources = source_features(src, ds, samples, metrics.n_features, batch_size, cluster)
        proba = np.zeros((len(samples), len(names)))
        if ok.any() and metrics.multilabel:
            from pipeline.heads.multilabel import label_scores

            proba[ok], _ = label_scores(loaded.model, X[ok])
        elif ok.any():
            proba[ok], _ = stage2_scores(loaded.model, X[ok], len(names))
        return proba, ok, why, sources, novelty(src, X, ok, metrics.get("novelty"), cfg)

    p.predict = predict
    return p


def novelty(src, X: np.ndarray, ok: np.ndarray, recorded: dict | None, cfg=None):
    """(each image's novelty against the train rows of the run's cache, NaN where unreadable; the run's
    threshold or None) — :mod:`pipeline.index.novelty`; (None, None) when the cache is gone."""
    if src.cache_path is None or not ok.any():
        return None, None
    from pipeline.cache.store import FeatureCache
    from pipeline.index.novelty import novelty_scores
    from pipeline.index.search import open_index
    from pipeline.utils.config import IndexConfig

    scores = np.full(len(X), np.nan)
    with FeatureCache(src.cache_path) as cache:
        index = open_index(cache, src.layer, cfg.index if cfg is not None else IndexConfig())
        scores[ok] = novelty_scores(index, X[ok])
    threshold = (recorded or {}).get("threshold")
    return scores, None if threshold is None else float(threshold)


def newest_model(cfg: Config) -> Path:
    """The run ``predict`` takes when none is named: the newest finished run (stage 2 or fine-tuned) of the
    cache ``cfg`` selects, as ``export`` takes it; one line on stderr says which."""
    from pipeline.cache.locate import resolve_run

    run = resolve_run(cfg)
    print(
        f"model: {run.name}, the newest finished run of this cache (--model to pick another)", file=sys.stderr
    )
    return run


def predict(
    model: str | Path | None, images: list[str], cfg: Config | str | Path | None = None, **options: Any
) -> tuple[Predictor, list[ImageResult]]:
    """Top-``predict.top_k`` (class index, name, probability) per image; unreadable images get an ``error``.

    ``model`` is a run folder, a run id or id prefix (looked up where ``cfg``'s runs are), a ``.keras``
    file, a SavedModel folder, a ``.tflite`` or an ``.onnx`` file; None: :func:`newest_model`. Every path is
    checked before TensorFlow is imported.
    ``cfg`` and keywords as every stage takes them (:func:`pipeline.utils.config.resolve_config`):
    ``top_k``, ``batch_size``, ``cluster`` (an address as ``--cluster`` takes: a stage-2 run's missing
    features on a Dask cluster) and ``trust_pickle`` (load a featcache 0.1 run's pickles: they can run code).
    """
    cfg = resolve_config(cfg, "predict", **options)
    top_k, batch_size = cfg.predict.top_k, cfg.predict.batch_size
    model = model or newest_model(cfg)
    check_model_kind(model_path(model, cfg))
    paths = expand_inputs(images)
    predictor = load_predictor(model, batch_size, cfg, cfg.cluster.address, cfg.security.trust_pickle)
    ds, samples = path_dataset([p.resolve() for p in paths])
    proba, ok, why, sources, *more = predictor.predict(ds, samples)
    scores, threshold = more[0] if more else (None, None)
    if isinstance(sources, str):
        sources = [sources] * len(samples)
    results = []
    for i, p in enumerate(paths):
        if not ok[i]:
            results.append(ImageResult(str(p), error=why[i] or "cannot read"))
            continue
        order = np.argsort(-proba[i], kind="stable")[:top_k]
        top = [(int(j), predictor.class_names[int(j)], float(proba[i, j])) for j in order]
        result = ImageResult(str(p), top, sources[i], labels=_above(predictor, proba[i]))
        if scores is not None and np.isfinite(scores[i]):
            result.novelty = round(float(scores[i]), 6)
            result.novel = None if threshold is None else bool(scores[i] > threshold)
        results.append(result)
    return predictor, results


def _above(predictor: Predictor, proba: np.ndarray) -> list[tuple[int, str, float]] | None:
    """Every class whose probability reaches its threshold, most probable first (None: single-label)."""
    if predictor.thresholds is None:
        return None
    from pipeline.heads.multilabel import above

    on = above(proba[None, :], predictor.thresholds)[0]
    order = np.argsort(-proba, kind="stable")
    return [(int(j), predictor.class_names[int(j)], float(proba[j])) for j in order if on[j]]


def _novelty_text(r: ImageResult) -> str:
    """``0.0412`` or ``0.3120 NOVEL`` (above the run's threshold); "" without a score."""
    if r.novelty is None:
        return ""
    return f"{r.novelty:.4f}" + (" NOVEL" if r.novel else "")


def format_table(results: list[ImageResult]) -> str:
    width = min(60, max((len(r.image) for r in results), default=5))
    cw = max([5] + [len(name) for r in results for _, name, _ in r.top])
    nov = any(r.novelty is not None for r in results)
    lines = [
        f"{'image':<{width}}  {'#':>2}  {'class':<{cw}}  {'probability':>11}  features"
        + ("  novelty" if nov else "")
    ]
    for r in results:
        name = r.image if len(r.image) <= width else "…" + r.image[-(width - 1) :]
        if r.error:
            lines.append(f"{name:<{width}}   -  error: {r.error}")
            continue
        first = f"{r.source:<8}  {_novelty_text(r)}" if nov else r.source
        if r.labels is not None and not r.labels:
            lines.append(f"{name:<{width}}   -  no label above its threshold  {first}".rstrip())
        for k, (_, cls, prob) in enumerate(r.top if r.labels is None else r.labels, 1):
            lines.append(
                f"{name if k == 1 else '':<{width}}  {k:>2}  {cls:<{cw}}  {prob:>11.4f}  {first if k == 1 else ''}".rstrip()
            )
    return "\n".join(lines)


def format_json(results: list[ImageResult]) -> str:
    return json.dumps(
        [
            {
                "image": r.image,
                "predictions": [{"class": c, "index": i, "probability": p} for i, c, p in r.top],
                "features": r.source or None,
                "novelty": r.novelty,
                "novel": r.novel,
                "error": r.error,
                **(
                    {}
                    if r.labels is None
                    else {"labels": [{"class": c, "index": i, "probability": p} for i, c, p in r.labels]}
                ),
            }
            for r in results
        ],
        indent=2,
    )


def format_csv(results: list[ImageResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "rank", "class", "index", "probability", "features", "error"])
    for r in results:
        if r.error:
            w.writerow([r.image, "", "", "", "", "", r.error])
        for k, (i, c, p) in enumerate(r.top, 1):
            w.writerow([r.image, k, c, i, f"{p:.6f}", r.source, ""])
    return buf.getvalue()
