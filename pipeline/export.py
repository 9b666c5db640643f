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
==================  ===========================================  =============================================

Preprocessing (and, for Keras/SavedModel, the shared resize) is inside every export: they take raw pixels.
TFLite has no builtin for the antialiased resize, so TFLite files take S×S images: resize with
:func:`pipeline.preprocess.resize_images` first (an S×S image needs nothing: that resize is the identity).

Every export is checked twice: its outputs against the Keras model's on sample images (max |Δ probability|),
and its accuracy on the whole validation split next to the Keras model's. :data:`TOLERANCES` says what
passes; full-int8 calibrates on decoded *training* images drawn from the cache (``--calibration N``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FeatcacheError

FORMATS = ("keras", "savedmodel", "tflite", "tflite-dynamic", "tflite-int8")
FILES = {
    "keras": "model.keras",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
    "tflite-dynamic": "model-dynamic.tflite",
    "tflite-int8": "model-int8.tflite",
}
#: What an export must meet. ``max_abs_diff``: max |Δ probability| vs Keras on the sample images.
#: ``accuracy_drop``: Keras val accuracy − export val accuracy, at most this (or one val image, if more).
TOLERANCES: dict[str, dict[str, float]] = {
    "keras": {"max_abs_diff": 1e-6},
    "savedmodel": {"max_abs_diff": 1e-5},
    "tflite": {"max_abs_diff": 1e-4},
    "tflite-dynamic": {"accuracy_drop": 0.02},
    "tflite-int8": {"accuracy_drop": 0.05},
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


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Exportable:
    """An end-to-end model plus what is needed to check it: its run's metrics and cache."""

    model: Any  # keras.Model, raw images (any size) → probabilities
    core: Any  # keras.Model, N×S×S×3 raw pixels → probabilities
    run_dir: Path
    kind: str  # "finetune" | "stage2"
    metrics: dict[str, Any]
    class_names: list[str]
    image_size: int
    resize: str
    cache_path: Path | None


def load_exportable(run_dir: str | Path) -> Exportable:
    """A fine-tuned run's ``model.keras``, or a stage-2 run rebuilt end to end (verified by its manifest)."""
    from .rebuild import load_keras, rebuild, run_source
    from .runs import verify_run

    run_dir = Path(run_dir)
    manifest = verify_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if manifest.get("kind") == "finetune":
        model = load_keras(run_dir / "model.keras")
        cache = Path((metrics.get("cache") or {}).get("path", ""))
        return Exportable(
            model, model.get_layer("core"), run_dir, "finetune", metrics, list(metrics["class_names"]),
            int(metrics["image_size"]), str(metrics["resize"]), cache if cache.is_file() else None,
        )  # fmt: skip
    rb = rebuild(run_dir)
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
    )


def latest_model_run(root: Path) -> Path:
    """The newest finished run under ``root``: fine-tuned (``root/finetune/*``) or stage 2 (``root/*``)."""
    found = [p.parent for p in root.glob("*/manifest.json")] + [
        p.parent for p in root.glob("finetune/*/manifest.json")
    ]
    if not found:
        raise FeatcacheError(
            f"no finished runs in {root}: run `featcache train` (and `featcache finetune`) first"
        )
    return max(found, key=lambda p: (p / "manifest.json").stat().st_mtime_ns)


def resolve_model_run(cfg, name: str | None) -> Path:
    """A run folder, a run id under the runs folder (stage 2 or ``finetune/``), or the newest run."""
    from .train import resolve_cache, runs_root

    if name and Path(name).is_dir():
        return Path(name)
    root = Path(cfg.train.runs_dir) if cfg.train.runs_dir else None
    if root is None:
        root = runs_root(cfg, resolve_cache(cfg)) if not name else Path(cfg.extract.cache_dir) / "runs"
    if not name:
        return latest_model_run(root)
    for cand in (root / name, root / "finetune" / name):
        if cand.is_dir():
            return cand
    raise FeatcacheError(f"run not found: {name}")


# --------------------------------------------------------------------------------------------- runners


def tflite_convert(core, image_size: int, mode: str, representative=None) -> bytes:
    """Convert the S×S core model; ``mode``: float | dynamic | int8 (float32 input and output)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from .engines import _quiet_absl, check_conversion_memory
    from .rebuild import quantizable

    check_conversion_memory("the model", core)  # a clear error, not the kernel's OOM killer
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def serve(x):
        return core(x, training=False)

    # quantized files trace the int8-friendly form of the head's transforms (same function, see quantizable)
    with quantizable(core) if mode != "float" else contextlib.nullcontext():
        frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    with _quiet_absl():
        conv = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if mode in ("dynamic", "int8"):
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "int8":
            if representative is None:
                raise ValueError("int8 needs a representative dataset")
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.float32
            conv.inference_output_type = tf.float32
        try:
            with (
                warnings.catch_warnings()
            ):  # "Statistics for quantized inputs were expected": float I/O is intended
                warnings.simplefilter("ignore", UserWarning)
                return conv.convert()
        except Exception as e:  # noqa: BLE001 - the converter raises many types
            raise FeatcacheError(
                f"TFLite conversion ({mode}) failed: {str(e).splitlines()[0][:300]}"
            ) from None


class TFLiteRunner:
    """A TFLite model with float32 N×S×S×3 input, run in chunks (LiteRT when installed, else tf.lite)."""

    def __init__(self, model: bytes | str | Path, threads: int = 0, chunk: int = 16):
        from .engines import _interpreter_class, default_threads

        cls, self.runtime = _interpreter_class()
        kw = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        self.it = cls(num_threads=threads or default_threads(), **kw)
        (inp,) = self.it.get_input_details()
        (out,) = self.it.get_output_details()
        self._in, self._out = inp["index"], out["index"]
        self.shape = [int(d) for d in inp["shape"]]
        self.image_size = self.shape[1]
        self.chunk, self._batch = chunk, -1

    def __call__(self, x) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x, np.float32))
        if x.ndim != 4 or list(x.shape[1:]) != self.shape[1:]:
            raise FeatcacheError(
                f"TFLite model expects N×{self.shape[1]}×{self.shape[2]}×3 images, got {x.shape}"
            )
        outs = []
        for i in range(0, len(x), self.chunk):
            c = x[i : i + self.chunk]
            if len(c) != self._batch:
                self.it.resize_tensor_input(self._in, [len(c), *self.shape[1:]])
                self.it.allocate_tensors()
                self._batch = len(c)
            self.it.set_tensor(self._in, c)
            self.it.invoke()
            outs.append(np.array(self.it.get_tensor(self._out)))
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def keras_runner(model):
    from .rebuild import compiled

    fn = compiled(model)
    return lambda x: fn(x).numpy()


def savedmodel_runner(path: Path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures.get("serve") or loaded.signatures["serving_default"]
    (key,) = fn.structured_outputs.keys()
    arg = next(iter(fn.structured_input_signature[1]))
    return lambda x: fn(**{arg: tf.constant(np.asarray(x, np.float32))})[key].numpy()


# --------------------------------------------------------------------------------------------- checks


def _images(ds, samples, size: int, policy: str, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Decoded + shared-resized S×S images (as extraction made them) and which ones could be read."""
    from .rebuild import image_batches

    imgs = np.zeros((len(samples), size, size, 3), np.float32)
    ok_all = np.zeros(len(samples), bool)
    for idx, x, ok, _ in image_batches(ds, samples, size, policy, batch_size):
        imgs[idx.numpy()] = x.numpy()
        ok_all[idx.numpy()] = np.reshape(ok.numpy(), -1)
    return imgs, ok_all


def _accuracy(
    run, images: np.ndarray, labels: np.ndarray, batch: int = 64
) -> tuple[float | None, np.ndarray]:
    if not len(images):
        return None, np.zeros((0, 0))
    proba = np.concatenate([run(images[i : i + batch]) for i in range(0, len(images), batch)])
    return float((proba.argmax(1) == labels).mean()), proba


def export(
    run_dir: str | Path,
    formats: list[str] | str = FORMATS,
    out: str | Path | None = None,
    *,
    calibration: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write each format under ``out`` (default ``<run>/export``), check it, write ``export.json``; return it."""
    from .finetune import split_images
    from .rebuild import cache_dataset
    from .runs import write_json
    from .store import FeatureCache

    formats = parse_formats(formats)
    src = load_exportable(run_dir)
    if src.cache_path is None:
        raise FeatcacheError(f"the cache of {src.run_dir} is gone: export checks each format on its images")
    out = Path(out) if out else src.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    S, policy = src.image_size, src.resize
    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)

    with FeatureCache(src.cache_path) as cache:
        ds = cache_dataset(cache.meta)
        val = split_images(cache, ds, "val")
        train = split_images(cache, ds, "train")
    eval_part = val if len(val.rows) else train
    eval_split = "val" if len(val.rows) else "train"
    say(f"reading {len(eval_part.samples)} {eval_split} images ...")
    images, ok = _images(ds, eval_part.samples, S, policy)
    images, labels = images[ok], eval_part.labels[ok]
    sample = images[:SAMPLE_IMAGES]
    raw_sample = _raw_images(ds, eval_part.samples[:3])

    keras_run = keras_runner(src.model)
    keras_acc, keras_val = _accuracy(keras_run, images, labels)
    keras_sample = keras_val[: len(sample)]
    report: dict[str, Any] = {
        "run": str(src.run_dir.resolve()),
        "run_kind": src.kind,
        "class_names": src.class_names,
        "image_size": S,
        "resize": policy,
        "eval_split": eval_split,
        "eval_images": int(len(images)),
        "sample_images": int(len(sample)),
        "keras_accuracy": keras_acc,
        "tolerances": {f: TOLERANCES[f] for f in formats},
        "formats": {},
    }
    rng = np.random.default_rng(seed)
    for fmt in formats:
        t0 = time.perf_counter()
        say(f"exporting {fmt} ...")
        path = out / FILES[fmt]
        if fmt == "keras":
            _atomic_keras(src.model, path)
            from .rebuild import load_keras

            reloaded = load_keras(path)
            run = keras_runner(reloaded)
            raw_diff = max(
                (float(np.abs(run(r[None]) - keras_run(r[None])).max()) for r in raw_sample), default=None
            )
        elif fmt == "savedmodel":
            tmp = out / f".saved_model.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            src.model.export(str(tmp), format="tf_saved_model", verbose=False)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            run = savedmodel_runner(path)
            raw_diff = max(
                (float(np.abs(run(r[None]) - keras_run(r[None])).max()) for r in raw_sample), default=None
            )
        else:
            mode = {"tflite": "float", "tflite-dynamic": "dynamic", "tflite-int8": "int8"}[fmt]
            rep = None
            if mode == "int8":
                rep = _representative(ds, train, S, policy, calibration, rng)
            blob = tflite_convert(src.core, S, mode, rep)
            tmp = out / f".{path.name}.{os.getpid()}.tmp"
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            run = TFLiteRunner(path)
            raw_diff = None
        acc, _ = _accuracy(run, images, labels)
        got = run(sample) if len(sample) else np.zeros((0, 0))
        diff = float(np.abs(got - keras_sample).max()) if len(sample) else None
        entry = {
            "path": str(path),
            "bytes": _size(path),
            "input": "N×H×W×3 float32 raw RGB 0..255, any size"
            if fmt in ("keras", "savedmodel")
            else f"N×{S}×{S}×3 float32 raw RGB 0..255 (resize with pipeline.preprocess.resize_images first)",
            "max_abs_diff": diff,
            "max_abs_diff_raw_size": raw_diff,
            "accuracy": acc,
            "keras_accuracy": keras_acc,
            "accuracy_delta": None if acc is None or keras_acc is None else acc - keras_acc,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        entry["ok"] = _passes(fmt, entry, len(images))
        report["formats"][fmt] = entry
    report["ok"] = all(e["ok"] for e in report["formats"].values())
    write_json(out / "export.json", report)
    return report


def _passes(fmt: str, e: dict[str, Any], n: int) -> bool:
    tol = TOLERANCES[fmt]
    if "max_abs_diff" in tol:
        diffs = [d for d in (e["max_abs_diff"], e["max_abs_diff_raw_size"]) if d is not None]
        return all(d <= tol["max_abs_diff"] for d in diffs)
    if e["accuracy_delta"] is None:
        return True
    allowed = max(tol["accuracy_drop"], 1.0 / max(n, 1)) + 1e-9
    return -e["accuracy_delta"] <= allowed


def _raw_images(ds, samples) -> list[np.ndarray]:
    """A few images at their own size (decoded exactly as extraction decodes them)."""
    from .decode import decode_image
    from .extract import to_rgb

    out = []
    for s in samples:
        with contextlib.suppress(Exception):
            raw = ds.read(s)
            out.append(np.asarray(decode_image(raw) if isinstance(raw, bytes) else to_rgb(raw), np.float32))
    return out


def _representative(ds, train, S: int, policy: str, n: int, rng):
    """Calibration for full int8: ``n`` decoded training images drawn at random from the cache's train rows."""
    pick = (
        rng.choice(len(train.samples), size=min(n, len(train.samples)), replace=False)
        if len(train.samples)
        else []
    )
    images, ok = _images(ds, [train.samples[int(i)] for i in pick], S, policy)
    images = images[ok]
    if not len(images):
        raise FeatcacheError("tflite-int8: no readable training images to calibrate on")

    def gen():
        for img in images:
            yield [img[None]]

    return gen


def _atomic_keras(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"exported {report['run']} ({report['run_kind']}) · input {report['image_size']} px, resize {report['resize']}",
        f"checked on {report['sample_images']} sample images and {report['eval_images']} {report['eval_split']} images"
        f" (Keras accuracy {_pct(report['keras_accuracy'])})",
        "",
        f"{'format':<15} {'size':>10} {'max|Δp|':>10} {'accuracy':>9} {'Δacc':>7}  tolerance            ok",
    ]
    for fmt, e in report["formats"].items():
        tol = report["tolerances"][fmt]
        t = (
            f"|Δp| ≤ {tol['max_abs_diff']:g}"
            if "max_abs_diff" in tol
            else f"acc drop ≤ {tol['accuracy_drop']:g}"
        )
        d = "-" if e["max_abs_diff"] is None else f"{e['max_abs_diff']:.1e}"
        delta = "-" if e["accuracy_delta"] is None else f"{e['accuracy_delta']:+.3f}"
        lines.append(
            f"{fmt:<15} {e['bytes'] / 1e6:>8.1f}MB {d:>10} {_pct(e['accuracy']):>9} {delta:>7}  {t:<20} {'yes' if e['ok'] else 'NO'}"
        )
    lines.append("")
    lines.append(
        f"files: {Path(next(iter(report['formats'].values()))['path']).parent}  (export.json has the details)"
    )
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.4f}"


__all__ = [
    "FORMATS",
    "TOLERANCES",
    "TFLiteRunner",
    "export",
    "format_report",
    "parse_formats",
    "load_exportable",
]


from ._callable import callable_module  # noqa: E402

callable_module(__name__, "export")
