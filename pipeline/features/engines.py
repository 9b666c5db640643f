"""Extraction engines: how the frozen feature model is *run*. Same graph, same features, different runtime.

An engine is a callable ``engine(images) -> {layer: np.ndarray}`` over a float32 N×S×S×3 batch of raw
pixels (a tf tensor or a numpy array), with a ``name``:

``tensorflow``
    The reference: a compiled ``model(x, training=False)`` (``predict`` in a loop leaks memory).
``tflite``
    The same Keras graph (preprocessing + backbone + pooling), frozen and converted once to a float32
    TFLite flatbuffer and run by the LiteRT interpreter (``ai-edge-litert``; ``tf.lite`` when LiteRT is
    not installed) with its default XNNPACK delegate, ``threads`` threads. The batch dimension stays
    dynamic, so one converted file serves every batch size, including the smaller last batch.
``tflite-int8``
    Full-integer int8: the same graph quantized with int8 kernels (float32 in and out), calibrated on a
    :class:`~pipeline.features.calibration.Calibration` set. Features change (mean cosine ~0.99 to
    float32), so it is opt-in, part of the cache fingerprint, and never chosen by ``auto``; backbone
    families that measured badly are refused (:func:`~pipeline.features.backbones.registry.check_int8`).
``tflite-dynamic``
    Dynamic-range int8 for KerasHub transformers (CNNs refused: slower); opt-in, in the fingerprint, never
    chosen by ``auto``, gated on the dataset's own train images (:mod:`pipeline.features.fidelity`).
``auto``
    ``tensorflow`` on a GPU (:mod:`pipeline.features.devices`). On the CPU, ``tflite`` when the backbone
    converts, its features match TensorFlow's and it ran faster than TensorFlow on this machine; otherwise
    ``tensorflow``, with a one-line note on stderr saying why.

Conversion is paid once: the flatbuffer is cached at ``<cache_dir>/engines/<backbone>-<hash>.tflite``
(written atomically), keyed by everything that defines the feature model (weights *content*, layers,
pooling, preprocessing, image size) and by the TensorFlow / runtime versions. A JSON sidecar next to it
records how it was validated: right after converting, both engines run on crops of real photos and the
largest relative difference per layer,
``max|tflite - tf| / max|tf|``, must be ≤ :data:`FEATURE_TOLERANCE`; it also records both engines' speed
on that batch, which is how ``auto`` decides. A failed conversion is recorded too, so ``auto`` does not
retry it on every run (explicit ``tflite`` always retries, and raises with the reason).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.features.backbones.registry import check_dynamic, check_int8
from pipeline.features.compiled import compiled
from pipeline.features.fidelity import gate
from pipeline.features.probes import (
    PROBE_IMAGES,
    best_rates,
    compare,
    mean_cosine,
    probe_images,
)
from pipeline.features.tflite import (
    EngineUnavailable,
    TFLiteRunner,
    check_conversion_memory,
    convert_frozen,
    freeze,
    interpreter_class,
)
from pipeline.utils.config import ENGINES
from pipeline.utils.errors import FeatcacheError, first_line
from pipeline.utils.io import atomic_write, read_json
from pipeline.utils.workers import usable_cores

#: Largest accepted ``max|engine - tensorflow| / max|tensorflow|`` per layer, checked once per conversion.
FEATURE_TOLERANCE = 1e-4

#: Bump when the conversion recipe changes (invalidates every cached ``.tflite``).
CONVERSION_FORMAT = 1

#: ``auto`` keeps TensorFlow unless TFLite measured at least this much faster at conversion time.
AUTO_MIN_SPEEDUP = 1.05

#: ``auto`` does not convert for a job smaller than this (when told its size): converting and validating
#: EfficientNet-Lite0 takes ~3 s, which TFLite's speed-up repays after several hundred images.
AUTO_MIN_IMAGES = 500

#: The engine each conversion mode (:func:`convert`'s ``quantize``) makes, and the quantized ones' modes.
ENGINE_NAMES = {"none": "tflite", "int8": "tflite-int8", "dynamic-int8": "tflite-dynamic"}
QUANTIZED = {name: q for q, name in ENGINE_NAMES.items() if q != "none"}

#: ``tflite-int8`` is refused when its mean cosine to TensorFlow's features on (the first 16 of) its
#: calibration images is lower: they are the dataset's own, the probe photos may be far from it.
INT8_MIN_COSINE = 0.9


class Engine(Protocol):
    name: str

    def __call__(self, images) -> dict[str, np.ndarray]: ...


def compute_dtype(fm) -> str:
    """``float32``, or ``float16`` for a model built with ``extract.precision=mixed_float16``."""
    policy = getattr(fm.model, "dtype_policy", None)
    return str(getattr(policy, "compute_dtype", "float32"))


class TensorFlowEngine:
    """The compiled Keras model, on the GPU when TensorFlow has one (``gpu``: said in the run's summary).

    A batch the device has no memory for is halved until it fits (then kept at that size, with one note).
    On a GPU with float32 precision, TensorFloat-32 is turned off: float32 features stay float32.
    """

    name = "tensorflow"

    def __init__(self, fm, why: str = "", gpu: bool = False):
        import tensorflow as tf

        self.why = why  # why ``auto`` chose TensorFlow, for the run's summary
        self.gpu, self.chunk = gpu, 0  # 0: whole batches until one does not fit
        if gpu and compute_dtype(fm) == "float32":
            tf.config.experimental.enable_tensor_float_32_execution(False)
        self._layers = list(fm.layers)
        self._fn = compiled(fm.model)
        self._model = fm.model  # :func:`compiled` holds it weakly

    def _run(self, x) -> dict[str, np.ndarray]:
        out = self._fn(x)
        return {layer: np.asarray(out[layer], np.float32) for layer in self._layers}  # mixed: float16

    def __call__(self, images) -> dict[str, np.ndarray]:
        import tensorflow as tf

        n = int(images.shape[0])
        while True:
            step = self.chunk or n
            try:
                parts = (
                    [self._run(images)]
                    if step >= n
                    else [self._run(images[s : s + step]) for s in range(0, n, step)]
                )
                break
            except tf.errors.ResourceExhaustedError:
                if step <= 1:
                    raise FeatcacheError(
                        "the backbone does not fit in the device's memory even one image at a time"
                    ) from None
                self.chunk = step // 2
                _note(
                    f"a batch of {step} images does not fit in the device's memory: running {self.chunk} at a time"
                )
        if len(parts) == 1:
            return parts[0]
        return {layer: np.concatenate([p[layer] for p in parts]) for layer in self._layers}


class TFLiteEngine:
    """A converted feature model in a TFLite interpreter; outputs mapped back to layer names by tensor name.

    A batch is run in chunks of ``micro_batch`` images (0: :func:`~pipeline.features.tflite.micro_batch_for`
    its threads); chunking does not change a feature, bit for bit (tests/test_engines.py).
    """

    name = "tflite"

    def __init__(
        self,
        model: bytes | str | Path,
        layers: list[str],
        outputs: dict[str, str],
        threads: int = 0,
        micro_batch: int = 0,
        name: str = "tflite",
    ):
        self.name = name  # tflite | tflite-int8 | tflite-dynamic
        self.fidelity: dict[str, Any] = {}  # tflite-dynamic: its figures on the dataset's gate set
        self.runner = TFLiteRunner(model, threads, micro_batch, what="tflite engine")
        self.runtime, self.threads, self.micro_batch = (
            self.runner.runtime,
            self.runner.threads,
            self.runner.chunk,
        )
        self.source, self.output_names = model, dict(outputs)  # to open the same model again
        self.layers = list(layers)
        by_name = self.runner.output_index
        missing = [t for t in outputs if t not in by_name]
        if missing or sorted(outputs.values()) != sorted(self.layers):
            raise EngineUnavailable(
                f"TFLite model outputs {sorted(by_name)} do not match the expected {sorted(outputs)}"
            )
        index = {layer: by_name[t] for t, layer in outputs.items()}
        self.indices = [index[layer] for layer in self.layers]

    @property
    def delegated(self) -> bool:
        return self.runner.delegated

    def __call__(self, images) -> dict[str, np.ndarray]:
        return dict(zip(self.layers, self.runner.run(images, self.indices), strict=True))


def convert(fm, quantize: str = "none", representative=None) -> tuple[bytes, dict[str, str]]:
    """Freeze ``fm.model`` (dynamic batch) and convert it to a TFLite flatbuffer with builtin ops only.

    Returns the flatbuffer and ``{tflite output tensor name: layer}``. Outputs are a tuple in ``fm.layers``
    order; the frozen graph names them ``Identity``, ``Identity_1``, ... and the converter keeps those
    names, so the mapping is by name, never by position or shape (checked again when loading).
    ``quantize="dynamic-int8"`` stores weights as int8 (dynamic-range, as ``export --format tflite-dynamic``
    converts): the ``tflite-dynamic`` engine; ``quantize="int8"`` is full-integer int8, calibrated on
    ``representative`` (N×S×S×3 float32 images), float32 in and out: the ``tflite-int8`` engine.
    """
    modes = {"none": "float", "dynamic-int8": "dynamic", "int8": "int8"}
    if quantize not in modes:
        raise ValueError(f"unknown quantize mode {quantize!r}")
    layers = list(fm.layers)

    def features(x):
        out = fm.model(x, training=False)
        return tuple(out[layer] for layer in layers)

    frozen = freeze(features, fm.image_size)
    names = [t.name.split(":")[0] for t in frozen.outputs]
    if len(names) != len(layers) or len(set(names)) != len(names):
        raise EngineUnavailable(f"frozen graph has outputs {names} for layers {layers}")
    feed = None
    if quantize == "int8":
        x = np.asarray(representative, np.float32)
        feed = lambda: ([x[i : i + 1]] for i in range(len(x)))  # noqa: E731 - the converter calls it
    return convert_frozen(frozen, modes[quantize], feed), dict(zip(names, layers, strict=True))


def engine_key(fm, quantize: str = "none", calibration=None) -> dict[str, Any]:
    """What identifies a converted model: the feature model's content, the toolchain that converts it and,
    for int8, the calibration set."""
    import keras
    import tensorflow as tf

    _, runtime = interpreter_class()
    digest = fm.weights_digest()  # hashing a large backbone's weights takes a moment: once per model
    key = {
        "format": CONVERSION_FORMAT,
        "backbone": fm.spec.name,
        "preprocess": fm.spec.preprocess,
        "weights_digest": digest,
        "layers": list(fm.layers),
        "outputs": list(fm.model.output_names),  # pooled output layers: encode the pooling
        "dims": dict(fm.dims),
        "map_shapes": dict(fm.map_shapes),
        "image_size": int(fm.image_size),
        "quantize": quantize,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "runtime": runtime,
    }
    if quantize == "int8":
        key["calibration"] = dict(calibration.key)
    return key


def engine_paths(
    fm, cache_dir: str | Path, quantize: str = "none", calibration=None
) -> tuple[Path, Path, dict]:
    key = engine_key(fm, quantize, calibration)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{fm.spec.name}-{h}" + ("" if quantize == "none" else f"-{quantize}")
    root = Path(cache_dir) / "engines"
    return root / f"{stem}.tflite", root / f"{stem}.json", key


def _store(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


#: Conversions done by this process (tests use it to check that a cached model is reused).
conversions = 0


def _note(msg: str) -> None:
    print(f"featcache: {msg}", file=sys.stderr, flush=True)


def load_or_convert(
    fm,
    threads: int = 0,
    cache_dir: str | Path | None = None,
    *,
    retry_failed: bool = True,
    quantize: str = "none",
    verbose: bool = True,
    calibration=None,
) -> tuple[TFLiteEngine, dict]:
    """The TFLite engine for ``fm`` and its sidecar record; converts and validates once, then reuses.

    Raises :class:`EngineUnavailable` when conversion fails, would not fit in memory (not recorded: that
    depends on the moment), or the converted features differ from TensorFlow's by more than
    :data:`FEATURE_TOLERANCE` (``quantize="none"``) or have a mean cosine under :data:`INT8_MIN_COSINE`
    (``quantize="int8"``, calibrated on ``calibration``). With ``quantize="dynamic-int8"``, ``calibration``
    is the gate set (:func:`pipeline.features.fidelity.gate`; None: no gate, for a cache already gated).
    """
    threads = threads or usable_cores()
    if quantize == "int8" and calibration is None:
        raise ValueError("int8 quantization needs a calibration set")
    if cache_dir is not None:
        model_path, meta_path, key = engine_paths(fm, cache_dir, quantize, calibration)
        cached = _load_cached(fm, threads, model_path, meta_path, key, retry_failed, ENGINE_NAMES[quantize])
        if cached is not None:
            return _gated(fm, *cached, meta_path, quantize, calibration)
    else:
        model_path = meta_path = None
        key = engine_key(fm, quantize, calibration)

    check_conversion_memory(fm.spec.name, fm.model)
    meta: dict[str, Any] = {"key": key, "ok": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        blob, engine = _convert_and_validate(fm, threads, quantize, meta, calibration)
    except EngineUnavailable as e:
        meta["reason"] = str(e)
        if meta_path is not None:
            _store(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        raise
    if model_path is not None:
        _store(model_path, blob)  # the model first: a sidecar never points at a missing file
        _store(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        meta["path"] = str(model_path)
    if verbose:
        error = (
            f"mean feature cosine {meta['mean_cosine']:.4f}"
            if quantize != "none"
            else f"max relative difference {max(meta['max_relative_diff'].values()):.1e}"
        )
        _note(
            f"converted {fm.spec.name} to TFLite{'' if quantize == 'none' else ' ' + quantize} in "
            f"{meta['convert_seconds']:.1f} s: {error} vs TensorFlow, {meta['speedup']:.2f}× its speed "
            f"on {meta['probe_images']} probe images"
            + (f" (cached at {model_path})" if model_path is not None else "")
        )
    return _gated(fm, engine, meta, meta_path, quantize, calibration)


def _gated(fm, engine: TFLiteEngine, meta: dict, meta_path, quantize: str, gate_set):
    """A dynamic-range engine checked on its gate set (its figures in ``engine.fidelity``); others as they are."""
    if quantize == "dynamic-int8" and gate_set is not None:
        reference = lambda: TensorFlowEngine(fm)  # noqa: E731 - built only when the set is new
        engine.fidelity = gate(fm.spec.name, engine, meta, meta_path, gate_set, reference, fm.image_size)
    return engine, meta


def _load_cached(fm, threads: int, model_path: Path, meta_path: Path, key, retry_failed: bool, name: str):
    """The engine over an earlier conversion recorded for ``key``; None when there is none to use."""
    meta = read_json(meta_path)
    if meta is None or meta.get("key") != key:
        return None
    if meta.get("ok") and model_path.is_file():
        meta["path"] = str(model_path)
        try:  # read, not mmap'd: a file replaced or truncated later cannot crash a running engine
            blob = model_path.read_bytes()
            return TFLiteEngine(blob, fm.layers, meta["outputs"], threads, name=name), meta
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: convert again
            _note(f"cached TFLite model {model_path} is unusable ({first_line(e)}); converting again")
    if not meta.get("ok") and not retry_failed:
        raise EngineUnavailable(meta.get("reason", "conversion failed before"))
    return None


def _convert_and_validate(fm, threads: int, quantize: str, meta: dict[str, Any], calibration=None):
    """Convert once, then check the features on real photos and time both engines on the same batch."""
    global conversions
    t0 = time.perf_counter()
    extra = {"representative": calibration.images(fm.image_size)} if quantize == "int8" else {}
    try:
        blob, outputs = convert(fm, quantize, **extra)
    except EngineUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - any converter failure means: not convertible
        raise EngineUnavailable(f"TFLite conversion of {fm.spec.name} failed: {first_line(e)}") from None
    conversions += 1
    meta.update(outputs=outputs, convert_seconds=round(time.perf_counter() - t0, 2), bytes=len(blob))
    x = probe_images(fm.image_size)
    reference = TensorFlowEngine(fm)
    try:
        engine = TFLiteEngine(blob, fm.layers, outputs, threads, name=ENGINE_NAMES[quantize])
        meta.update(runtime=engine.runtime, threads=threads, delegated=engine.delegated)
        diffs = compare(engine, reference, x)
        own = extra.get("representative", x)[:PROBE_IMAGES]
        cosine = mean_cosine(engine(own), reference(own)) if quantize != "none" else 1.0
        tf_rate, lite_rate = best_rates([reference, engine], x)
    except EngineUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - the runtime cannot run what the converter wrote
        raise EngineUnavailable(
            f"the TFLite runtime cannot run converted {fm.spec.name}: {first_line(e)}"
        ) from None
    meta.update(
        probe_images=len(x),
        max_relative_diff=diffs,
        tensorflow_images_per_s=round(tf_rate, 1),
        tflite_images_per_s=round(lite_rate, 1),
        speedup=round(lite_rate / tf_rate, 3),
    )
    worst = max(diffs.values())
    if quantize == "none" and not worst <= FEATURE_TOLERANCE:
        raise EngineUnavailable(
            f"TFLite features of {fm.spec.name} differ from TensorFlow's by {worst:.2g} (relative) > "
            f"{FEATURE_TOLERANCE:g}"
        )
    if quantize != "none":  # dynamic-int8: on the probe photos (its gate is on the dataset's images)
        meta["mean_cosine"] = round(cosine, 5)
    if quantize == "int8" and not cosine >= INT8_MIN_COSINE:
        raise EngineUnavailable(
            f"{fm.spec.name} does not quantize well to int8: mean feature cosine {cosine:.3f} to TensorFlow's "
            f"on its calibration images (< {INT8_MIN_COSINE}); use extract.engine=auto or tflite"
        )
    meta["ok"] = True
    return blob, engine


def cached_conversion(fm, cache_dir: str | Path | None) -> dict | None:
    """The sidecar record of a converted model of ``fm`` already in ``cache_dir`` (ok or failed), if any."""
    if cache_dir is None:
        return None
    model_path, meta_path, key = engine_paths(fm, cache_dir)
    meta = read_json(meta_path)
    if meta is None or meta.get("key") != key or (meta.get("ok") and not model_path.is_file()):
        return None
    return meta


def tf_thread_count(n: int) -> int:
    """The intra-op threads :func:`configure_tf_threads` gives TensorFlow for ``n`` (0 = all cores)."""
    import os

    return n or os.cpu_count() or 1


def configure_tf_threads(n: int) -> None:
    """TensorFlow's thread pools for this process (0 = all cores); must run before TensorFlow starts."""
    import tensorflow as tf

    n = tf_thread_count(n)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, n))
    except RuntimeError:
        pass  # already initialized in this process: keep what it has


def make_engine(
    fm,
    name: str = "tensorflow",
    threads: int = 0,
    cache_dir: str | None = None,
    *,
    images: int | None = None,
    calibration=None,
) -> Engine:
    """The engine called ``name`` for feature model ``fm``; ``auto`` picks the fastest that works.

    ``threads`` (0 = all cores) sizes the TFLite interpreter's thread pool; TensorFlow's pools are set by
    the caller (:func:`configure_tf_threads`) before TensorFlow starts. ``images``, when
    the caller knows how many images will run, lets ``auto`` skip a first conversion that a job smaller
    than :data:`AUTO_MIN_IMAGES` would not pay back (a model converted earlier is always used).
    ``calibration`` is the set ``tflite-int8`` is calibrated on, or ``tflite-dynamic`` gated on. A model
    built with mixed precision runs on TensorFlow only.
    """
    from pipeline.features.devices import visible_gpus

    mixed = compute_dtype(fm) != "float32"
    if mixed and name in ("tflite", *QUANTIZED):
        raise FeatcacheError(f"extract.precision=mixed_float16 runs on TensorFlow: not with engine {name}")
    if name == "tensorflow":
        return TensorFlowEngine(fm, gpu=bool(visible_gpus()))
    if name == "tflite":
        engine, _ = load_or_convert(fm, threads, cache_dir, retry_failed=True)
        return engine
    if name in QUANTIZED:
        (check_int8 if name == "tflite-int8" else check_dynamic)(fm.spec)
        engine, _ = load_or_convert(fm, threads, cache_dir, quantize=QUANTIZED[name], calibration=calibration)
        return engine
    gpus = visible_gpus() if name == "auto" else []
    if gpus:
        return TensorFlowEngine(fm, f"auto: TensorFlow on the GPU ({', '.join(gpus)}), no TFLite", gpu=True)
    if name == "auto" and mixed:
        return TensorFlowEngine(fm, "auto: mixed precision runs on TensorFlow")
    if name == "auto":
        if images is not None and images < AUTO_MIN_IMAGES and cached_conversion(fm, cache_dir) is None:
            # said in the run's summary, not on stderr: a run that then fails still says one line
            why = f"auto: {images} images, under {AUTO_MIN_IMAGES}: converting to TFLite would not pay back"
            return TensorFlowEngine(fm, why)
        try:
            engine, meta = load_or_convert(fm, threads, cache_dir, retry_failed=False)
        except EngineUnavailable as e:
            _note(f"engine auto: using tensorflow ({e})")
            return TensorFlowEngine(fm)
        if meta.get("speedup", 0.0) < AUTO_MIN_SPEEDUP:
            _note(
                f"engine auto: using tensorflow (TFLite ran {meta.get('speedup', 0.0):.2f}× its speed for "
                f"{fm.spec.name} here)"
            )
            return TensorFlowEngine(fm)
        return engine
    raise FeatcacheError(f"extract.engine must be one of {', '.join(ENGINES)}, got {name!r}")
