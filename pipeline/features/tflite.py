"""TFLite in one place: the interpreter, the one runner around it, and the one frozen-graph conversion.

Both the extraction engine (:mod:`pipeline.features.engines`) and ``export`` convert and run models
through these functions, so a conversion refused for memory, the quiet converter logs and the chunked
interpreter calls behave the same wherever a ``.tflite`` file is made or used.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np

from pipeline.utils.errors import FeatcacheError
from pipeline.utils.workers import usable_cores

#: Converting takes about this many times the model's float32 weights in extra memory (peak RSS above the
#: built model, measured: ResNet50 94 MB → +2.3 GB, ConvNeXt-Base 350 MB → +7.4 GB). ConvNeXt-XLarge's
#: 1.4 GB would need ~31 GiB: the kernel's OOM killer, not an error message, unless refused up front.
CONVERT_MEMORY_FACTOR = 24


class EngineUnavailable(FeatcacheError):
    """TFLite cannot run this feature model (conversion failed, or its features differ from TensorFlow's)."""


def interpreter_class():
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


@contextlib.contextmanager
def quiet_absl():
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


def convert_frozen(frozen, mode: str = "float", representative=None) -> bytes:
    """A frozen concrete function as a TFLite flatbuffer with builtin ops only.

    ``mode``: ``float`` (float32, what extraction uses), ``dynamic`` (int8 weights, dynamic-range) or
    ``int8`` (full integer kernels, calibrated on ``representative``; float32 input and output).
    """
    import tensorflow as tf

    with quiet_absl():
        conv = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if mode in ("dynamic", "int8"):
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        elif mode != "float":
            raise ValueError(f"unknown conversion mode {mode!r}")
        if mode == "int8":
            if representative is None:
                raise ValueError("int8 needs a representative dataset")
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.float32
            conv.inference_output_type = tf.float32
        with warnings.catch_warnings():  # "Statistics for quantized inputs were expected": float I/O is meant
            warnings.simplefilter("ignore", UserWarning)
            return conv.convert()


def freeze(fn, image_size: int):
    """``fn`` over a dynamic N×S×S×3 float32 batch, traced and with its variables folded into constants."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")
    return convert_variables_to_constants_v2(tf.function(fn, input_signature=[spec]).get_concrete_function())


#: Images per interpreter invocation at most (see :func:`micro_batch_for`).
MICRO_BATCH = 4


def micro_batch_for(threads: int) -> int:
    """Images per ``invoke()`` for an interpreter with ``threads`` threads: about one image per thread.

    XNNPACK splits each layer between its threads, so a chunk of one image per thread keeps every core's
    share of the activations in its own cache. Measured on 2 cores (1 MiB L2 each), EfficientNet-Lite0 at
    224 px: one 2-thread process 85 images/s in chunks of 2 against 78 in chunks of 4 (whole extraction,
    4 interleaved repetitions); two 1-thread processes side by side 104 in chunks of 1 against 89 in
    chunks of 4 (backbone alone, 6 repetitions). Four or more threads keep chunks of 4 (not measured).
    """
    return max(1, min(MICRO_BATCH, threads))


class TFLiteRunner:
    """A TFLite model with one float32 N×S×S×3 input, run ``chunk`` images per ``invoke()`` (0: about one
    per thread, :func:`micro_batch_for`).

    The one wrapper around the interpreter (LiteRT when installed, else ``tf.lite``): the extraction engine
    maps its outputs to layer names, ``predict`` and ``export`` read the single output.
    """

    def __init__(
        self, model: bytes | str | Path, threads: int = 0, chunk: int = 0, what: str = "TFLite model"
    ):
        cls, self.runtime = interpreter_class()
        self.threads = threads or usable_cores()
        kw = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        where = "" if isinstance(model, bytes) else f"{model}: "
        try:
            self.interpreter = cls(num_threads=self.threads, **kw)
            inputs = self.interpreter.get_input_details()
        except (ValueError, RuntimeError) as e:  # a file that is not a flatbuffer, or one TFLite cannot run
            raise FeatcacheError(f"{where}cannot load this {what} ({str(e)[:120]})") from None
        if len(inputs) != 1 or len(inputs[0]["shape"]) != 4 or int(inputs[0]["shape"][-1]) != 3:
            raise FeatcacheError(f"{where}this {what} does not take one N×S×S×3 image input")
        inp = inputs[0]
        self.input_index = inp["index"]
        self.shape = [int(d) for d in inp["shape"]]
        self.image_size = self.shape[1]
        details = self.interpreter.get_output_details()
        self.output_index = {d["name"]: d["index"] for d in details}
        self.output_shape = {d["index"]: [int(v) for v in d["shape"][1:]] for d in details}
        self.chunk, self.what, self.batch = int(chunk) or micro_batch_for(self.threads), what, -1

    @property
    def delegated(self) -> bool:
        """Whether a delegate (XNNPACK, the default for float CPU models) took over part of the graph."""
        self.ensure_batch(max(self.batch, 1))
        return any(op["op_name"] == "DELEGATE" for op in self.interpreter._get_ops_details())

    def ensure_batch(self, n: int) -> None:
        if n != self.batch:
            self.interpreter.resize_tensor_input(self.input_index, [n, *self.shape[1:]])
            self.interpreter.allocate_tensors()
            self.batch = n

    def run(self, images, outputs: list[int]) -> list[np.ndarray]:
        """The given output tensors (by index) for a batch, computed ``chunk`` images at a time."""
        x = images.numpy() if hasattr(images, "numpy") else images
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or list(x.shape[1:]) != self.shape[1:]:
            want = "×".join(map(str, self.shape[1:]))
            raise FeatcacheError(f"{self.what}: expected an N×{want} batch, got {x.shape}")
        n, m = len(x), self.chunk
        out = [np.empty((n, *self.output_shape[i]), np.float32) for i in outputs]
        for s in range(0, n, m):
            part = x[s : s + m]
            self.ensure_batch(len(part))  # only the last chunk may resize (a cheap XNNPACK reshape)
            self.interpreter.set_tensor(self.input_index, part)
            self.interpreter.invoke()  # releases the GIL: tf.data decode and the writer keep running
            for o, i in zip(out, outputs, strict=True):
                o[s : s + len(part)] = self.interpreter.get_tensor(i)
        return out

    @property
    def n_outputs(self) -> int:
        (shape,) = self.output_shape.values()
        return shape[-1]

    def __call__(self, images) -> np.ndarray:
        """The model's single output."""
        (index,) = self.output_shape
        return self.run(images, [index])[0]
