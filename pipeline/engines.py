"""Extraction engines: how the frozen feature model is *run*. Same graph, same features, different runtime.

An engine is a callable ``engine(images) -> {layer: np.ndarray}`` over a float32 N×S×S×3 batch of raw
pixels (a tf tensor or a numpy array), with a ``name``:

``tensorflow``
    The reference: a compiled ``model(x, training=False)`` (not ``predict`` in a loop, which leaks memory
    over many calls).
``tflite``
    The same Keras graph (preprocessing + backbone + pooling), frozen and converted once to a float32
    TFLite flatbuffer and run by the LiteRT interpreter (``ai-edge-litert``; ``tf.lite`` when LiteRT is
    not installed) with its default XNNPACK delegate, ``threads`` threads. The batch dimension stays
    dynamic, so one converted file serves every batch size, including the smaller last batch.
``auto``
    ``tflite`` when the backbone converts, its features match TensorFlow's and it ran faster than
    TensorFlow on this machine; otherwise ``tensorflow``, with a one-line note on stderr saying why.

Conversion is paid once: the flatbuffer is cached at ``<cache_dir>/engines/<backbone>-<hash>.tflite``
(written atomically), keyed by everything that defines the feature model (weights *content*, layers,
pooling, preprocessing, image size) and by the TensorFlow / runtime versions. A JSON sidecar next to it
records how it was validated: right after converting, both engines run on a few crops of real photos
(scikit-learn's sample images) and the largest relative difference per layer,
``max|tflite - tf| / max|tf|``, must be ≤ :data:`FEATURE_TOLERANCE`; it also records both engines' speed
on that batch, which is how ``auto`` decides. A failed conversion is recorded too, so ``auto`` does not
retry it on every run (explicit ``tflite`` always retries, and raises with the reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import FeatcacheError

#: Largest accepted ``max|engine - tensorflow| / max|tensorflow|`` per layer, checked once per conversion.
FEATURE_TOLERANCE = 1e-4
#: Bump when the conversion recipe changes (invalidates every cached ``.tflite``).
CONVERSION_FORMAT = 1
#: ``auto`` keeps TensorFlow unless TFLite measured at least this much faster at conversion time.
AUTO_MIN_SPEEDUP = 1.05
#: ``auto`` does not convert for a job smaller than this (when told its size): converting and validating
#: EfficientNet-Lite0 takes ~3 s, which TFLite's speed-up repays after several hundred images.
AUTO_MIN_IMAGES = 500
#: Images per interpreter invocation (see :class:`TFLiteEngine`); 0 in the constructor means this.
MICRO_BATCH = 4
#: Validation / speed-probe batch: this many crops of real photos.
PROBE_IMAGES = 16
#: Converting takes about this many times the model's float32 weights in extra memory (peak RSS above the
#: built model, measured: ResNet50 94 MB → +2.3 GB, ConvNeXt-Base 350 MB → +7.4 GB). ConvNeXt-XLarge's
#: 1.4 GB would need ~31 GiB: the kernel's OOM killer, not an error message, unless refused up front.
CONVERT_MEMORY_FACTOR = 24

ENGINE_NAMES = ("auto", "tensorflow", "tflite")


class Engine(Protocol):
    name: str

    def __call__(self, images) -> dict[str, np.ndarray]: ...


class EngineUnavailable(FeatcacheError):
    """TFLite cannot run this feature model (conversion failed, or its features differ from TensorFlow's)."""


def default_threads() -> int:
    """All cores this process may use (the affinity mask, not the host's count, inside containers)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def max_relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """``max|got - want| / max|want|``: the feature error measure used everywhere in this module."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    if not np.all(np.isfinite(got)):
        return float("inf")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    return diff / scale if scale > 0 else diff


def _as_array(images) -> np.ndarray:
    x = images.numpy() if hasattr(images, "numpy") else images
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- TensorFlow


class TensorFlowEngine:
    name = "tensorflow"

    def __init__(self, fm):
        import tensorflow as tf

        self._layers = list(fm.layers)
        self._fn = tf.function(lambda x: fm.model(x, training=False), reduce_retracing=True)

    def __call__(self, images) -> dict[str, np.ndarray]:
        out = self._fn(images)
        return {layer: out[layer].numpy() for layer in self._layers}


# ----------------------------------------------------------------------------------------------- TFLite


def _interpreter_class():
    """LiteRT's interpreter (the maintained runtime) when installed, else TensorFlow's bundled ``tf.lite``."""
    try:
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        try:
            return Interpreter, f"litert-{version('ai-edge-litert')}"
        except Exception:  # noqa: BLE001 - metadata missing: still usable
            return Interpreter, "litert"
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter, f"tf.lite-{tf.__version__}"


class TFLiteEngine:
    """A converted feature model in a TFLite interpreter; outputs mapped back to layer names by tensor name.

    A batch is run in chunks of ``micro_batch`` images (default :data:`MICRO_BATCH`): XNNPACK is faster on
    small chunks than on a whole batch of 32 at 224 px, whose activations do not fit in the CPU caches
    (EfficientNet-Lite0, 2 threads: ~400 images/s in chunks of 1–4, ~330 at 32). Every image is computed
    independently, so chunking does not change what a feature is.
    """

    name = "tflite"

    def __init__(
        self,
        model: bytes | str | Path,
        layers: list[str],
        outputs: dict[str, str],
        threads: int = 0,
        micro_batch: int = 0,
    ):
        cls, self.runtime = _interpreter_class()
        self.source, self.output_names = model, dict(outputs)  # to open the same model again
        self.threads = threads or default_threads()
        kw = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        self._it = cls(num_threads=self.threads, **kw)
        self._layers = list(layers)
        (inp,) = self._it.get_input_details()
        self._input = inp["index"]
        self._shape = [int(d) for d in inp["shape"]]
        by_name = {d["name"]: d["index"] for d in self._it.get_output_details()}
        missing = [t for t in outputs if t not in by_name]
        if missing or sorted(outputs.values()) != sorted(self._layers):
            raise EngineUnavailable(
                f"TFLite model outputs {sorted(by_name)} do not match the expected {sorted(outputs)}"
            )
        self._outputs = {layer: by_name[t] for t, layer in outputs.items()}
        shapes = {d["index"]: [int(v) for v in d["shape"][1:]] for d in self._it.get_output_details()}
        self._out_shapes = {layer: shapes[i] for layer, i in self._outputs.items()}
        self.micro_batch = int(micro_batch) or MICRO_BATCH
        self._batch = -1

    @property
    def delegated(self) -> bool:
        """Whether a delegate (XNNPACK, the default for float CPU models) took over part of the graph."""
        self._ensure_batch(max(self._batch, 1))
        return any(op["op_name"] == "DELEGATE" for op in self._it._get_ops_details())

    def _ensure_batch(self, n: int) -> None:
        if n != self._batch:
            self._it.resize_tensor_input(self._input, [n, *self._shape[1:]])
            self._it.allocate_tensors()
            self._batch = n

    def __call__(self, images) -> dict[str, np.ndarray]:
        x = _as_array(images)
        if x.ndim != 4 or list(x.shape[1:]) != self._shape[1:]:
            want = "×".join(map(str, self._shape[1:]))
            raise FeatcacheError(f"tflite engine: expected an N×{want} batch, got {x.shape}")
        n, m = len(x), self.micro_batch
        out = {layer: np.empty((n, *self._out_shapes[layer]), np.float32) for layer in self._layers}
        for i in range(0, n, m):
            chunk = x[i : i + m]
            self._ensure_batch(len(chunk))  # only the last chunk may resize (a cheap XNNPACK reshape)
            self._it.set_tensor(self._input, chunk)
            self._it.invoke()  # releases the GIL: tf.data decode and the writer thread keep running
            for layer in self._layers:
                out[layer][i : i + len(chunk)] = self._it.get_tensor(self._outputs[layer])
        return out


@contextlib.contextmanager
def _quiet_absl():
    """The converter logs a deprecation warning for the frozen-graph path on every call; keep stderr clean."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover
        yield
        return
    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


def convert(fm, quantize: str = "none") -> tuple[bytes, dict[str, str]]:
    """Freeze ``fm.model`` (dynamic batch) and convert it to a TFLite flatbuffer with builtin ops only.

    Returns the flatbuffer and ``{tflite output tensor name: layer}``. Outputs are a tuple in ``fm.layers``
    order; the frozen graph names them ``Identity``, ``Identity_1``, ... and the converter keeps those
    names, so the mapping is by name, never by position or shape (checked again when loading).
    ``quantize="dynamic-int8"`` stores weights as int8 (dynamic-range quantization): an explicit,
    feature-changing opt-in, never used by ``auto``.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    layers = list(fm.layers)
    spec = tf.TensorSpec([None, fm.image_size, fm.image_size, 3], tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def features(x):
        out = fm.model(x, training=False)
        return tuple(out[layer] for layer in layers)

    frozen = convert_variables_to_constants_v2(features.get_concrete_function())
    names = [t.name.split(":")[0] for t in frozen.outputs]
    if len(names) != len(layers) or len(set(names)) != len(names):
        raise EngineUnavailable(f"frozen graph has outputs {names} for layers {layers}")
    with _quiet_absl():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "dynamic-int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantize != "none":
            raise ValueError(f"unknown quantize mode {quantize!r}")
        blob = converter.convert()
    return blob, dict(zip(names, layers, strict=True))


def weight_bytes(model) -> int:
    """Bytes of a Keras model's weights as float32, which is what the converter freezes into the file."""
    return 4 * int(model.count_params())


def available_memory() -> int | None:
    """Bytes this process can still allocate: Linux ``MemAvailable``, capped by a cgroup (container) limit.

    ``None`` where neither can be read (then nothing is refused).
    """
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # macOS: total, not free
        except (AttributeError, OSError, ValueError):
            pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            left = int(Path(limit).read_text()) - int(Path(usage).read_text())  # "max" → ValueError
        except (OSError, ValueError):
            continue
        avail = left if avail is None else min(avail, left)
        break
    return avail


def check_conversion_memory(what: str, model) -> None:
    """Refuse (EngineUnavailable) converting ``model`` when that would run this machine out of memory."""
    need, avail = CONVERT_MEMORY_FACTOR * weight_bytes(model), available_memory()
    if avail is not None and need > avail:
        raise EngineUnavailable(
            f"converting {what} to TFLite needs about {need / 2**30:.1f} GiB of memory, "
            f"{max(avail, 0) / 2**30:.1f} GiB is available"
        )


# ----------------------------------------------------------------------------------------------- validation


def probe_images(size: int, n: int = PROBE_IMAGES) -> np.ndarray:
    """``n`` deterministic crops/flips of scikit-learn's two sample photos, resized to ``size`` (raw 0..255)."""
    from sklearn.datasets import load_sample_images

    from .preprocess import resize_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427×640 RGB
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[top : top + side, left : left + side]
        if i % 4 >= 2:
            crop = crop[:, ::-1]
        out.append(np.asarray(resize_images(np.ascontiguousarray(crop), size)))
    return np.stack(out).astype(np.float32)


def compare(engine, reference, images) -> dict[str, float]:
    """Per-layer :func:`max_relative_diff` of ``engine``'s features against ``reference``'s on ``images``."""
    got, want = engine(images), reference(images)
    return {layer: max_relative_diff(got[layer], want[layer]) for layer in want}


def _best_rates(engines_: list, x, reps: int = 5) -> list[float]:
    """Images/s of each engine on ``x``: best of ``reps`` runs, interleaved so load bursts hit all alike."""
    for fn in engines_:
        fn(x)  # warm-up: traces / allocates / packs weights
    best = [float("inf")] * len(engines_)
    for _ in range(reps):
        for i, fn in enumerate(engines_):
            t = time.perf_counter()
            fn(x)
            best[i] = min(best[i], time.perf_counter() - t)
    return [len(x) / b for b in best]


# ----------------------------------------------------------------------------------------------- cache


def engine_key(fm, quantize: str = "none") -> dict[str, Any]:
    """What identifies a converted model: the feature model's content and the toolchain that converts it."""
    import keras
    import tensorflow as tf

    _, runtime = _interpreter_class()
    digest = getattr(fm, "_engine_weights_digest", None)
    if digest is None:  # hashing the weights of a large backbone takes a moment: once per model object
        digest = fm.weights_digest()
        fm._engine_weights_digest = digest
    return {
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


def engine_paths(fm, cache_dir: str | Path, quantize: str = "none") -> tuple[Path, Path, dict]:
    key = engine_key(fm, quantize)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{fm.spec.name}-{h}" + ("" if quantize == "none" else f"-{quantize}")
    root = Path(cache_dir) / "engines"
    return root / f"{stem}.tflite", root / f"{stem}.json", key


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


#: Conversions done by this process (tests use it to check that a cached model is reused).
conversions = 0


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0] or type(e).__name__)[:300]


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
) -> tuple[TFLiteEngine, dict]:
    """The TFLite engine for ``fm`` and its sidecar record; converts and validates once, then reuses.

    Raises :class:`EngineUnavailable` when conversion fails, would not fit in memory (not recorded: that
    depends on the moment), or the converted features differ from TensorFlow's by more than
    :data:`FEATURE_TOLERANCE` (for ``quantize="none"``).
    """
    global conversions
    threads = threads or default_threads()
    if cache_dir is not None:
        model_path, meta_path, key = engine_paths(fm, cache_dir, quantize)
        meta = _read_json(meta_path)
        if meta is not None and meta.get("key") == key:
            if meta.get("ok") and model_path.is_file():
                meta["path"] = str(model_path)
                try:  # read, not mmap'd: a file replaced or truncated later cannot crash a running engine
                    return TFLiteEngine(model_path.read_bytes(), fm.layers, meta["outputs"], threads), meta
                except Exception as e:  # noqa: BLE001 - a damaged or foreign file: convert again
                    _note(
                        f"cached TFLite model {model_path} is unusable ({_first_line(e)}); converting again"
                    )
            if not meta.get("ok") and not retry_failed:
                raise EngineUnavailable(meta.get("reason", "conversion failed before"))
    else:
        model_path = meta_path = None
        key = engine_key(fm, quantize)

    check_conversion_memory(fm.spec.name, fm.model)
    meta: dict[str, Any] = {"key": key, "ok": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t0 = time.perf_counter()
    try:
        try:
            blob, outputs = convert(fm, quantize)
        except EngineUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - any converter failure means: not convertible
            raise EngineUnavailable(f"TFLite conversion of {fm.spec.name} failed: {_first_line(e)}") from None
        conversions += 1
        meta.update(outputs=outputs, convert_seconds=round(time.perf_counter() - t0, 2), bytes=len(blob))
        # Validate on real photos and measure both engines on the same batch, once per conversion.
        x = probe_images(fm.image_size)
        reference = TensorFlowEngine(fm)
        try:
            engine = TFLiteEngine(blob, fm.layers, outputs, threads)
            meta.update(runtime=engine.runtime, threads=threads, delegated=engine.delegated)
            diffs = compare(engine, reference, x)
            tf_rate, lite_rate = _best_rates([reference, engine], x)
        except EngineUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - the runtime cannot run what the converter wrote
            raise EngineUnavailable(
                f"the TFLite runtime cannot run converted {fm.spec.name}: {_first_line(e)}"
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
        meta["ok"] = True
    except EngineUnavailable as e:
        meta["reason"] = str(e)
        if meta_path is not None:
            _atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        raise
    if model_path is not None:
        _atomic_write(model_path, blob)  # the model first: a sidecar never points at a missing file
        _atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        meta["path"] = str(model_path)

    if verbose:
        _note(
            f"converted {fm.spec.name} to TFLite in {meta['convert_seconds']:.1f} s: max relative difference "
            f"{worst:.1e} vs TensorFlow, {meta['speedup']:.2f}× its speed on {len(x)} probe images"
            + (f" (cached at {model_path})" if model_path is not None else "")
        )
    return engine, meta


# ----------------------------------------------------------------------------------------------- choice


def cached_conversion(fm, cache_dir: str | Path | None) -> dict | None:
    """The sidecar record of a converted model of ``fm`` already in ``cache_dir`` (ok or failed), if any."""
    if cache_dir is None:
        return None
    model_path, meta_path, key = engine_paths(fm, cache_dir)
    meta = _read_json(meta_path)
    if meta is None or meta.get("key") != key or (meta.get("ok") and not model_path.is_file()):
        return None
    return meta


def make_engine(
    fm,
    name: str = "tensorflow",
    threads: int = 0,
    cache_dir: str | None = None,
    *,
    images: int | None = None,
) -> Engine:
    """The engine called ``name`` for feature model ``fm``; ``auto`` picks the fastest that works.

    ``threads`` (0 = all cores) sizes the TFLite interpreter's thread pool; TensorFlow's pools are set by
    the caller (:func:`pipeline.extract._configure_threads`) before TensorFlow starts. ``images``, when
    the caller knows how many images will run, lets ``auto`` skip a first conversion that a job smaller
    than :data:`AUTO_MIN_IMAGES` would not pay back (a model converted earlier is always used).
    """
    if name == "tensorflow":
        return TensorFlowEngine(fm)
    if name == "tflite":
        engine, _ = load_or_convert(fm, threads, cache_dir, retry_failed=True)
        return engine
    if name == "auto":
        if images is not None and images < AUTO_MIN_IMAGES and cached_conversion(fm, cache_dir) is None:
            return TensorFlowEngine(fm)
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
    raise FeatcacheError(f"extract.engine must be one of {', '.join(ENGINE_NAMES)}, got {name!r}")


__all__ = [
    "ENGINE_NAMES",
    "FEATURE_TOLERANCE",
    "Engine",
    "EngineUnavailable",
    "TFLiteEngine",
    "TensorFlowEngine",
    "available_memory",
    "cached_conversion",
    "check_conversion_memory",
    "compare",
    "convert",
    "default_threads",
    "load_or_convert",
    "make_engine",
    "max_relative_diff",
    "probe_images",
    "weight_bytes",
]
