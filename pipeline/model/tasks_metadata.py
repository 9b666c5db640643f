"""MediaPipe Tasks metadata on exported TFLite files, written with MediaPipe's own metadata writers.

MediaPipe's ``ImageClassifier`` and ``ImageEmbedder`` refuse a bare TFLite file: they need the input's
``NormalizationOptions`` (and a classifier, its label file). Every featcache TFLite model takes raw RGB
0..255 pixels and preprocesses inside its graph, so the normalization written is mean 0, std 1: MediaPipe
feeds the pixels as they are. The image size is the model's input tensor (S×S); the classifier's label file
is the run's class names in output order; the output's description says what its scores are (softmax, or a
multi-label run's independent sigmoids, whose per-class thresholds are in ``export.json``).

Why ``mediapipe`` and not ``tflite-support``: ``tflite-support`` was last released in 2023 (0.4.4) and pins
``protobuf<4``, which TensorFlow 2.21 (``protobuf>=6.31``) cannot share; MediaPipe's writers are its successor.
Only the newer ``mediapipe`` wheels (0.10.35, 1.x; 1.2 is required) install beside TensorFlow 2.21 (0.10.21 pins ``protobuf<5`` and
``numpy<2``),
and those wheels ship the writers' Python but not their small compiled helper
``_pywrap_metadata_version`` (``GetMinimumMetadataParserVersion``: the oldest metadata parser that reads a
buffer). :func:`min_parser_version` is that function in Python, made available to the writers only when the
compiled one is missing; everything else is the official writer (the same calls as
``metadata_writers.image_classifier``), so the files are what MediaPipe Model Maker writes.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any

from pipeline.utils.errors import FeatcacheError

#: The normalization written: the graph takes raw 0..255 pixels and preprocesses them itself.
NORM_MEAN, NORM_STD = [0.0], [1.0]
LABEL_FILE = "labels.txt"
MEDIAPIPE_MISSING = (
    "MediaPipe metadata needs the deploy extra (pip install 'featcache[deploy]': mediapipe>=1.2)"
)

_HELPER = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"

#: Schema members added after metadata 1.0.0 → the parser version that reads them (MediaPipe's table).
_VERSIONS = {
    "vocabulary": (1, 0, 1),
    "process_units": (1, 1, 0),
    "bert": (1, 1, 0),
    "sentencepiece": (1, 1, 0),
    "tensor_groups": (1, 2, 0),
    "regex": (1, 2, 1),
    "audio": (1, 3, 0),
    "scann": (1, 4, 0),
    "file_version": (1, 4, 1),
    "custom_metadata": (1, 5, 0),
}


def min_parser_version(buffer: bytes) -> str:
    """The oldest metadata parser version that reads this ``ModelMetadata`` buffer (what MediaPipe's
    compiled ``GetMinimumMetadataParserVersion`` returns): the newest schema member the buffer uses."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    md = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAs(bytes(buffer), 0))
    used: list[tuple[int, int, int]] = [(1, 0, 0)]

    def files(items):
        for f in items or []:
            used.extend(
                [_VERSIONS["vocabulary"]] * (f.type == fb.AssociatedFileType.VOCABULARY)
                + [_VERSIONS["scann"]] * (f.type == fb.AssociatedFileType.SCANN_INDEX_FILE)
                + [_VERSIONS["file_version"]] * (f.version is not None)
            )

    def units(items):
        kinds = {
            fb.ProcessUnitOptions.BertTokenizerOptions: "bert",
            fb.ProcessUnitOptions.SentencePieceTokenizerOptions: "sentencepiece",
            fb.ProcessUnitOptions.RegexTokenizerOptions: "regex",
        }
        used.extend(_VERSIONS[kinds[u.optionsType]] for u in items or [] if u.optionsType in kinds)

    for sg in md.subgraphMetadata or []:
        for t in (sg.inputTensorMetadata or []) + (sg.outputTensorMetadata or []):
            files(t.associatedFiles)
            units(t.processUnits)
            if (
                t.content is not None
                and t.content.contentPropertiesType == fb.ContentProperties.AudioProperties
            ):
                used.append(_VERSIONS["audio"])
        files(sg.associatedFiles)
        for present in (sg.inputProcessUnits, sg.outputProcessUnits):
            if present is not None:
                used.append(_VERSIONS["process_units"])
                units(present)
        if sg.inputTensorGroups is not None or sg.outputTensorGroups is not None:
            used.append(_VERSIONS["tensor_groups"])
        if sg.customMetadata is not None:
            used.append(_VERSIONS["custom_metadata"])
    files(md.associatedFiles)
    return ".".join(map(str, max(used)))


def available() -> bool:
    """Whether MediaPipe is installed (a dependency wherever it has wheels: Linux x86-64, macOS arm64,
    Windows); elsewhere TFLite files are written without metadata and ``export`` says so."""
    from importlib.util import find_spec

    return find_spec("mediapipe") is not None


def _writer():
    """MediaPipe's generic ``MetadataWriter`` module (its compiled version helper supplied when missing)."""
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        raise FeatcacheError(MEDIAPIPE_MISSING) from None
    try:
        __import__(_HELPER)
    except ImportError:
        parent = _HELPER.rsplit(".", 1)[0]
        for name in ("mediapipe.tasks.cc", "mediapipe.tasks.cc.metadata", parent):
            sys.modules.setdefault(name, types.ModuleType(name))
        helper = types.ModuleType(_HELPER)
        helper.GetMinimumMetadataParserVersion = min_parser_version
        sys.modules[_HELPER] = helper
        sys.modules[parent]._pywrap_metadata_version = helper
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer

    return metadata_writer


def scores_description(multilabel: bool, n: int) -> str:
    if multilabel:
        return (
            f"Independent sigmoid probability of each of the {n} labels (multi-label: a label is on when its "
            "score reaches its own threshold, listed in export.json)."
        )
    return f"Softmax probabilities over the {n} classes (they sum to 1)."


def _populate(build) -> bytes:
    """The model bytes of the writer ``build()`` makes. The writer lives only inside the ``finally`` below:
    MediaPipe's populate keeps its callers' frames alive, and a writer still held by one at exit warns
    from its ``__del__`` (its temporary folder)."""
    writer = build()
    try:
        model, _ = writer.populate()
    except ValueError as e:  # the writer's own checks (tensor counts, types)
        raise FeatcacheError(f"MediaPipe metadata: {str(e)[:200]}") from None
    finally:
        del writer
    return bytes(model)


def classifier_metadata(model: bytes, class_names: list[str], multilabel: bool = False) -> bytes:
    """``model`` with the metadata MediaPipe's ``ImageClassifier`` needs: RGB image input, normalization
    mean 0 / std 1 (raw pixels), the class names as its label file, a description of the scores."""
    mw = _writer()
    kind = "multi-label" if multilabel else "single-label"
    labels = mw.Labels().add([str(c) for c in class_names])
    return _populate(
        lambda: (
            mw.MetadataWriter.create(bytearray(model))
            .add_general_info(
                "ImageClassifier", f"featcache {kind} image classifier ({len(class_names)} classes)."
            )
            .add_image_input(NORM_MEAN, NORM_STD)
            .add_classification_output(labels, description=scores_description(multilabel, len(class_names)))
        )
    )


def embedder_metadata(model: bytes) -> bytes:
    """``model`` with the metadata MediaPipe's ``ImageEmbedder`` needs: RGB image input with normalization
    mean 0 / std 1 (raw pixels) and one feature output (the cached feature of the run's backbone)."""
    mw = _writer()
    return _populate(
        lambda: (
            mw.MetadataWriter.create(bytearray(model))
            .add_general_info("ImageEmbedder", "featcache backbone: the feature vector its cache holds.")
            .add_image_input(NORM_MEAN, NORM_STD)
            .add_feature_output("embedding", "The backbone's pooled feature, as cached by featcache extract.")
        )
    )


def read_metadata(model: bytes) -> dict[str, Any] | None:
    """The metadata of a TFLite file as MediaPipe reads it (JSON) plus its label file's lines; None if none."""
    _writer()
    from mediapipe.tasks.python.metadata import metadata

    try:
        shown = metadata.MetadataDisplayer.with_model_buffer(bytearray(model))
    except ValueError:  # "The model does not have metadata."
        return None
    info = json.loads(shown.get_metadata_json())
    if LABEL_FILE in shown.get_packed_associated_file_list():
        info["labels"] = shown.get_associated_file_buffer(LABEL_FILE).decode("utf-8").splitlines()
    return info


def summary(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``export.json`` records of a file's metadata: task, normalization, labels, parser version."""
    if info is None:
        return None
    (sg,) = info["subgraph_metadata"]
    (inp,) = sg["input_tensor_metadata"]
    norm = next(
        u["options"] for u in inp.get("process_units", []) if u["options_type"] == "NormalizationOptions"
    )
    (out,) = sg["output_tensor_metadata"]
    return {
        "task": info["name"],
        "normalization": {"mean": norm["mean"], "std": norm["std"]},
        "label_file": LABEL_FILE if "labels" in info else None,
        "labels": len(info.get("labels", [])),
        "scores": out.get("description", ""),
        "min_parser_version": info.get("min_parser_version"),
    }
