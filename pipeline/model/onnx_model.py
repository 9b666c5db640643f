"""ONNX in one place: converting an end-to-end core model to ONNX and running ``.onnx`` files in ONNX Runtime.

The conversion is Keras 3's own exporter (``model.export(format="onnx")``: tf2onnx under the TensorFlow
backend, with the numpy-2 fixes Keras applies to it), over the S×S core every TFLite file is made from: raw
RGB 0..255 pixels in (preprocessing inside), probabilities out. Everything is an optional extra
(``featcache[onnx]``: onnx, tf2onnx, onnxruntime); without it an ``onnx`` export or an ``.onnx`` model is one
line naming the extra.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np

from pipeline.utils.errors import FeatcacheError, first_line

ONNX_EXTRA = "pip install 'featcache[onnx]'"
#: ONNX opset of the exported files: ONNX Runtime 1.17 and later run it (tf2onnx's default is older).
OPSET = 17


class OnnxConversionError(FeatcacheError):
    """The converter refused this model (an op it cannot express): the export's other formats go on."""


def missing(need_converter: bool = True) -> str | None:
    """Which ONNX packages cannot be imported, as one line naming the extra; None when all can."""
    import importlib

    gone = []
    for name in ["onnxruntime", *(["onnx", "tf2onnx"] if need_converter else [])]:
        try:
            importlib.import_module(name)
        except ImportError:
            gone.append(name)
    return f"{', '.join(gone)} not installed: {ONNX_EXTRA}" if gone else None


def require(what: str, need_converter: bool = True) -> None:
    """Raise the one-line error naming the extra when the packages ``what`` needs are missing."""
    why = missing(need_converter)
    if why:
        raise FeatcacheError(f"{what} needs ONNX Runtime{' and tf2onnx' if need_converter else ''}: {why}")


def to_onnx(core, image_size: int, path: Path) -> None:
    """Write ``core`` (N×S×S×3 raw pixels → probabilities) to ``path`` as ONNX, input ``image`` (N dynamic).

    tf2onnx does not raise on a TensorFlow op it cannot express: it logs it and writes a graph ONNX Runtime
    refuses. Its log is read here instead (and kept off stderr), so such a model is one
    :class:`OnnxConversionError` naming the ops."""
    import tensorflow as tf

    require("--format onnx")
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")
    with _converter_log() as log:
        try:
            core.export(str(path), format="onnx", input_signature=[spec], opset_version=OPSET, verbose=False)
        except Exception as e:  # noqa: BLE001 - the converter raises many types; its reason is what matters
            raise OnnxConversionError(f"tf2onnx: {first_line(e, 300)}") from None
    ops = sorted({m.group(1) for r in log for m in [UNSUPPORTED.search(r)] if m})
    if ops:
        raise OnnxConversionError(f"tf2onnx has no ONNX equivalent of the TensorFlow op(s) {', '.join(ops)}")
    if not Path(path).is_file():
        raise OnnxConversionError(f"tf2onnx wrote no file{': ' + log[-1] if log else ''}")


#: How tf2onnx names an op it cannot convert in its log.
UNSUPPORTED = re.compile(r"Tensorflow op \[[^\]]*?: (\w+)\] is not supported")


@contextlib.contextmanager
def _converter_log():
    """tf2onnx's warnings and errors, collected instead of printed (and Keras' numpy-2 patch warning muted)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("tf2onnx")
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class OnnxRunner:
    """An ``.onnx`` model with one N×S×S×3 float32 image input, in ONNX Runtime (CPU); calls return its
    single output as a numpy array, like :class:`pipeline.features.tflite.TFLiteRunner`."""

    def __init__(self, path: str | Path, threads: int = 0):
        require(f"--model {path}", need_converter=False)
        import onnxruntime as ort

        from pipeline.utils.workers import usable_cores

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or usable_cores()
        opts.log_severity_level = 3  # errors only: no graph-optimizer chatter on stderr
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - not an ONNX file, or one ORT cannot run
            raise FeatcacheError(f"{path}: cannot load this ONNX model ({first_line(e, 160)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        if (
            len(outputs) != 1
            or len(shape) != 4
            or shape[3] != 3
            or not all(isinstance(d, int) for d in shape[1:3])
        ):
            raise FeatcacheError(
                f"{path}: this ONNX model does not take one N×S×S×3 image input to one output"
            )
        self.input_name = inputs[0].name
        self.image_size = int(shape[1])
        out = outputs[0].shape
        self.n_outputs = int(out[-1]) if out and isinstance(out[-1], int) else None

    def __call__(self, images) -> np.ndarray:
        x = np.ascontiguousarray(images.numpy() if hasattr(images, "numpy") else images, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]
