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

import contextlib
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given; folders walked recursively for image files (hidden ones skipped), sorted."""
    from pipeline.data.decode import IMAGE_EXTENSIONS

    out: list[Path] = []
    for raw in items:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [
                    Path(dirpath) / f
                    for f in sorted(filenames)
                    if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
                ]
            if not found:
                raise FeatcacheError(f"{raw}: no image files in this folder")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise FeatcacheError(f"image not found: {raw}")
    if not out:
        raise FeatcacheError("no images given")
    return out


def _dataset(paths: list[Path]):
    from pipeline.data.sources import Dataset, Sample, storable_key

    samples = [Sample(storable_key(str(p)), "", path=str(p)) for p in paths]
    return Dataset("predict", "<paths>", samples, [""]), samples


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
            return _stage2_predictor(path, batch_size, cluster, trust)
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
    """Decode + shared resize in tf.data (``p``'s size, resize and decode policy), ``run`` on each S×S batch;
    (proba, ok, why)."""
    from pipeline.data.images import image_batches

    n = len(samples)
    proba = None
    ok_all, why_all = np.zeros(n, bool), [""] * n
    read = image_batches(ds, samples, p.image_size, p.resize, batch_size, decode=p.decode)
    for idx, x, ok, why in read:
        idx, ok, why = idx.numpy(), np.reshape(ok.numpy(), -1), np.reshape(why.numpy(), -1)
        keep = np.flatnonzero(ok)
        if len(keep):
            p = np.asarray(run(x.numpy()[keep]), np.float64)
            if proba is None:
                proba = np.zeros((n, p.shape[1]))
            proba[idx[keep]] = p
        for j in np.flatnonzero(~ok):
            why_all[int(idx[j])] = why[j].decode("utf-8", "replace")
        ok_all[idx] = ok
    return proba, ok_all, why_all


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


def _stage2_predictor(run_dir: Path, batch_size: int, cluster: str, trust_pickle: bool) -> Predictor:
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
        from pipeline.data.decode import DecodeError
        from pipeline.data.sources import digest_bytes

        n = len(samples)
        X = np.zeros((n, metrics.n_features), np.float32)
        have = np.zeros(n, bool)
        sources = ["computed"] * n
        if src.cache_path is not None:
            from pipeline.cache.store import FeatureCache

            with FeatureCache(src.cache_path) as c:
                row_of = {d: i for i, d in enumerate(c.ids)}
                hits = {}
                for i, s in enumerate(samples):
                    try:
                        d = s.digest or digest_bytes(ds.read(s))
                    except (DecodeError, OSError):
                        continue  # reported by the decoding pass below
                    if d in row_of:
                        hits[i] = row_of[d]
                if hits:
                    idx = np.asarray(list(hits))
                    X[idx] = c.features(src.layer, np.asarray([hits[i] for i in idx]))
                    have[idx] = True
                    for i in idx:
                        sources[int(i)] = "cache"
        ok = have.copy()
        why = [""] * n
        todo = [i for i in range(n) if not have[i]]
        if todo:
            # The engine that made the cache's features (:func:`run_engine`): ``auto`` reuses a TFLite model
            # extraction already converted (validated against TensorFlow when it was converted), and an int8
            # cache's own int8 model, so new images cost what extraction does and match the cached rows.
            cache_dir = src.cache_path.parent if src.cache_path is not None else None
            part = [samples[i] for i in todo]
            name, precision, calibration = run_engine(src)
            if cluster:
                feats, ok_t, why_t = _cluster_features(cluster, src, ds, part, batch_size, cache_dir)
            else:
                from pipeline.features.engines import make_engine

                fm = _feature_model(src, precision)
                engine = make_engine(fm, name, 0, cache_dir, images=len(todo), calibration=calibration)
                feats, ok_t, why_t = _batched(ds, part, p, batch_size, lambda x: engine(x)[src.layer])
            for j, i in enumerate(todo):
                ok[i], why[i] = bool(ok_t[j]), why_t[j]
                if ok_t[j]:
                    X[i] = feats[j]
        proba = np.zeros((n, len(names)))
        if ok.any() and metrics.multilabel:
            from pipeline.heads.multilabel import label_scores

            proba[ok], _ = label_scores(loaded.model, X[ok])
        elif ok.any():
            proba[ok], _ = stage2_scores(loaded.model, X[ok], len(names))
        return proba, ok, why, sources

    p.predict = predict
    return p


def _backbone_config(src):
    from pipeline.model.rebuild import known_fields
    from pipeline.utils.config import BackboneConfig

    cfg = BackboneConfig(**known_fields(BackboneConfig, {**src.backbone, "layers": [src.layer]}))
    cfg.image_size = src.image_size
    return cfg


def _feature_model(src, precision: str = "float32"):
    from pipeline.features.backbones.build import build_feature_model

    return build_feature_model(_backbone_config(src), precision)


def run_engine(src) -> tuple[str, str, Any]:
    """The engine, precision and int8 calibration set the run's cache was extracted with (from its feature
    key): ``auto`` and float32 for every float cache, ``tflite-dynamic`` for a dynamic-range one."""
    from pipeline.cache.fingerprint import keyed_engine
    from pipeline.features.calibration import recorded

    key = (src.cache_meta or {}).get("feature_key") or {}
    precision, engine = str(key.get("precision", "float32")), keyed_engine(key)
    if engine != "tflite-int8":  # tflite-dynamic: no calibration, its gate passed when the cache was made
        return engine or "auto", precision, None
    return engine, precision, recorded(key["engine"], src.cache_meta)


def _cluster_features(address: str, src, ds, samples, batch_size: int, cache_dir):
    """The features of ``samples`` computed by the Dask cluster at ``address`` (the shard tasks extraction
    runs, the run's backbone settings); (features, ok, why) in ``samples`` order. The head stays here."""
    from pipeline.features.distributed import ShardSettings, run_shards
    from pipeline.utils.cluster import cluster_client

    n = len(samples)
    feats, ok, why = None, np.zeros(n, bool), [""] * n
    cache = str(cache_dir or "")
    name, precision, calibration = run_engine(src)
    settings = ShardSettings.make(
        _backbone_config(src),
        name,
        0,
        cache,
        batch_size,
        "float32",
        n,
        src.decode,
        address,
        precision=precision,
    )
    with cluster_client(address) as client:  # the dashboard link on stderr, as extract prints it
        again = "run the same command again"
        shards = run_shards(client, settings, ds, samples, address, again, calibration=calibration)
        with contextlib.closing(shards):
            for start, _, r in shards:
                rows = start + np.asarray(r.ids, np.int64)
                if feats is None:
                    feats = np.zeros((n, r.dims[src.layer]), np.float32)
                feats[rows] = r.features[src.layer]
                ok[rows] = True
                for k, reason in r.bad:
                    why[start + k] = reason
    return feats, ok, why


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
    ds, samples = _dataset([p.resolve() for p in paths])
    proba, ok, why, sources = predictor.predict(ds, samples)
    if isinstance(sources, str):
        sources = [sources] * len(samples)
    results = []
    for i, p in enumerate(paths):
        if not ok[i]:
            results.append(ImageResult(str(p), error=why[i] or "cannot read"))
            continue
        order = np.argsort(-proba[i], kind="stable")[:top_k]
        top = [(int(j), predictor.class_names[int(j)], float(proba[i, j])) for j in order]
        results.append(ImageResult(str(p), top, sources[i], labels=_above(predictor, proba[i])))
    return predictor, results


def _above(predictor: Predictor, proba: np.ndarray) -> list[tuple[int, str, float]] | None:
    """Every class whose probability reaches its threshold, most probable first (None: single-label)."""
    if predictor.thresholds is None:
        return None
    from pipeline.heads.multilabel import above

    on = above(proba[None, :], predictor.thresholds)[0]
    order = np.argsort(-proba, kind="stable")
    return [(int(j), predictor.class_names[int(j)], float(proba[j])) for j in order if on[j]]


def format_table(results: list[ImageResult]) -> str:
    width = min(60, max((len(r.image) for r in results), default=5))
    cw = max([5] + [len(name) for r in results for _, name, _ in r.top])
    lines = [f"{'image':<{width}}  {'#':>2}  {'class':<{cw}}  {'probability':>11}  features"]
    for r in results:
        name = r.image if len(r.image) <= width else "…" + r.image[-(width - 1) :]
        if r.error:
            lines.append(f"{name:<{width}}   -  error: {r.error}")
            continue
        if r.labels is not None and not r.labels:
            lines.append(f"{name:<{width}}   -  no label above its threshold  {r.source}".rstrip())
        for k, (_, cls, prob) in enumerate(r.top if r.labels is None else r.labels, 1):
            lines.append(
                f"{name if k == 1 else '':<{width}}  {k:>2}  {cls:<{cw}}  {prob:>11.4f}  {r.source if k == 1 else ''}".rstrip()
            )
    return "\n".join(lines)


def format_json(results: list[ImageResult]) -> str:
    return json.dumps(
        [
            {
                "image": r.image,
                "predictions": [{"class": c, "index": i, "probability": p} for i, c, p in r.top],
                "features": r.source or None,
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
