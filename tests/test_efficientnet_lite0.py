"""EfficientNet-Lite0 port: exact logits vs. the original PyTorch model, and a safe checkpoint reader.

The reference logits were produced by the original PyTorch model on 13 images with input
``(x - 127) / 128``; they live in the repo's sibling ``shared/`` folder (or ``$FEATCACHE_SHARED``).
The checkpoint-reader tests write real ``.pth`` byte streams by hand (no torch needed).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.features.backbones.efficientnet_lite import (
    DEFAULT_IMAGE_SIZE,
    build_efficientnet_lite0,
    preprocess,
    weights_file,
)
from pipeline.features.backbones.torch_checkpoint import load_state_dict

LOGIT_TOLERANCE = 1e-4


def _shared_dir() -> Path:
    override = os.environ.get("FEATCACHE_SHARED")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / ".." / "shared"


REFERENCE = _shared_dir() / "data" / "reference" / "efficientnet_lite0_reference.npz"


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.is_file():
        pytest.skip(f"EfficientNet-Lite0 reference logits not found at {REFERENCE} (set FEATCACHE_SHARED)")
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def classifier():
    return build_efficientnet_lite0(include_top=True, weights="imagenet")


def test_port_reproduces_reference_logits(reference, classifier):
    x = preprocess(reference["images"].astype(np.float32))
    logits = np.asarray(classifier(x, training=False))
    expected = reference["logits"]
    assert logits.shape == expected.shape == (13, 1000)
    max_diff = float(np.max(np.abs(logits - expected)))
    print(f"EfficientNet-Lite0 max |delta logits| vs PyTorch reference: {max_diff:.3g}")
    assert max_diff <= LOGIT_TOLERANCE
    disagree = [
        str(name)
        for name, got, want in zip(reference["names"], logits.argmax(1), expected.argmax(1), strict=True)
        if got != want
    ]
    assert not disagree, f"top-1 class differs for {disagree}"


def test_cut_feature_map_feeds_the_classifier(reference, classifier):
    features_model = build_efficientnet_lite0(include_top=False, weights="imagenet")
    x = preprocess(reference["images"].astype(np.float32))
    fmap = np.asarray(features_model(x, training=False))
    n = len(x)
    assert fmap.shape == (n, DEFAULT_IMAGE_SIZE // 32, DEFAULT_IMAGE_SIZE // 32, 1280)
    assert fmap.min() >= 0.0 and fmap.max() <= 6.0  # ends in ReLU6
    pooled = fmap.mean(axis=(1, 2))
    logits = np.asarray(classifier.get_layer("predictions")(pooled))
    full = np.asarray(classifier(x, training=False))
    assert np.max(np.abs(logits - full)) <= 1e-5
    assert np.max(np.abs(logits - reference["logits"])) <= LOGIT_TOLERANCE
    # Cutting the classifier at its named layer gives the same map.
    cut = classifier.get_layer("top_activation").output
    sub = keras.Model(classifier.input, cut)
    assert np.max(np.abs(np.asarray(sub(x, training=False)) - fmap)) <= 1e-5


def test_layer_names_follow_keras_applications(classifier):
    names = {layer.name for layer in classifier.layers}
    for name in (
        "stem_conv",
        "stem_bn",
        "stem_activation",
        "block1a_dwconv",
        "block1a_project_bn",
        "block2a_expand_conv",
        "block2b_add",
        "block6d_add",
        "block7a_project_bn",
        "top_conv",
        "top_bn",
        "top_activation",
        "avg_pool",
        "predictions",
    ):
        assert name in names
    assert classifier.name == "efficientnet_lite0"
    assert not any("se_" in name for name in names)  # Lite has no squeeze-excite
    assert weights_file().is_file()


def test_preprocess_convention():
    x = np.array([0, 127, 255], dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(x), np.array([-127 / 128, 0.0, 1.0], dtype=np.float32))
    assert preprocess(x.astype(np.float32)).dtype == np.float32


# --- hand-written .pth files -------------------------------------------------------------------


class _Global:
    """A name the hand-written pickle references as a global (GLOBAL opcode)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class _Call:
    """Pickles as ``global(*args)`` (GLOBAL ... REDUCE), like torch's tensor reductions."""

    def __init__(self, fn: _Global, *args):
        self.fn, self.args = fn, args


class _Storage:
    def __init__(self, key: str, kind: str, data: np.ndarray):
        self.key, self.kind, self.data = key, kind, data


class _PthPickler(pickle._Pickler):
    """Pure-python pickler that writes torch-style globals and storage persistent ids by hand."""

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            pid = ("storage", _Global("torch", obj.kind), obj.key, "cpu", obj.data.size)
            return pid + (None,) if self.legacy else pid
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        if isinstance(obj, _Call):
            self.save(obj.fn)
            self.save(obj.args)
            self.write(pickle.REDUCE)
            return
        super().save(obj, save_persistent_id)


def _pickle(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    pickler = _PthPickler(buf, legacy)
    pickler.dump(obj)
    return buf.getvalue()


def _write_zip_pth(path: Path, obj, storages) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _pickle(obj))
        zf.writestr("archive/byteorder", "little")
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
        zf.writestr("archive/version", "3\n")


def _write_legacy_pth(path: Path, obj, storages) -> None:
    parts = [
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
        _pickle(obj, legacy=True),
        pickle.dumps([s.key for s in storages], protocol=2),
    ]
    for s in storages:
        parts.append(struct.pack("<q", s.data.size) + s.data.tobytes())
    path.write_bytes(b"".join(parts))


def _tensor(storage, offset, size, stride):
    rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
    return _Call(rebuild, storage, offset, tuple(size), tuple(stride), False, OrderedDict())


def _sample_state_dict():
    """Storages plus a state_dict exercising offsets, strides, shared storage and dtypes."""
    base = np.arange(24, dtype=np.float32)
    half = (np.arange(6, dtype=np.float16) / 4).astype(np.float16)
    longs = np.array([7, -3], dtype=np.int64)
    s_float = _Storage("0", "FloatStorage", base)
    s_half = _Storage("1", "HalfStorage", half)
    s_long = _Storage("2", "LongStorage", longs)
    param = _Call(
        _Global("torch._utils", "_rebuild_parameter"),
        _tensor(s_float, 0, (4, 6), (6, 1)),
        True,
        OrderedDict(),
    )
    obj = _Call(
        _Global("collections", "OrderedDict"),
        [
            ("contiguous", _tensor(s_float, 0, (2, 3, 4), (12, 4, 1))),
            ("transposed", _tensor(s_float, 0, (6, 4), (1, 6))),  # a .t() view: column-major
            ("offset_view", _tensor(s_float, 5, (3,), (2,))),
            ("half", _tensor(s_half, 1, (5,), (1,))),
            ("scalar_long", _tensor(s_long, 1, (), ())),
            ("param", param),
        ],
    )
    expected = {
        "contiguous": base.reshape(2, 3, 4),
        "transposed": base.reshape(4, 6).T,
        "offset_view": base[5:11:2],
        "half": half[1:6],
        "scalar_long": np.array(-3, dtype=np.int64),
        "param": base.reshape(4, 6),
    }
    return obj, [s_float, s_half, s_long], expected


@pytest.mark.parametrize("writer", [_write_zip_pth, _write_legacy_pth], ids=["zip", "legacy"])
def test_checkpoint_reader_round_trip(tmp_path, writer):
    obj, storages, expected = _sample_state_dict()
    path = tmp_path / "sample.pth"
    writer(path, obj, storages)
    state = load_state_dict(path)
    assert set(state) == set(expected)
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.flags.c_contiguous


@pytest.mark.parametrize("writer", [_write_zip_pth, _write_legacy_pth], ids=["zip", "legacy"])
def test_checkpoint_reader_refuses_forbidden_globals(tmp_path, writer):
    marker = tmp_path / "pwned"
    evil = _Call(_Global("os", "system"), f"touch {marker}")
    obj = _Call(_Global("collections", "OrderedDict"), [("weight", evil)])
    path = tmp_path / "evil.pth"
    writer(path, obj, [])
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        load_state_dict(path)
    assert not marker.exists()
    # The file really does carry the call: a GLOBAL 'os system' opcode followed by REDUCE.
    raw = zipfile.ZipFile(path).read("archive/data.pkl") if zipfile.is_zipfile(path) else path.read_bytes()
    assert b"cos\nsystem\n" in raw


def test_checkpoint_reader_refuses_out_of_bounds_views(tmp_path):
    storage = _Storage("0", "FloatStorage", np.zeros(4, dtype=np.float32))
    obj = _Call(_Global("collections", "OrderedDict"), [("w", _tensor(storage, 2, (4,), (1,)))])
    path = tmp_path / "oob.pth"
    _write_zip_pth(path, obj, [storage])
    with pytest.raises(pickle.UnpicklingError, match="exceeds"):
        load_state_dict(path)


def test_packaged_checkpoint_is_read_without_torch():
    state = load_state_dict(weights_file())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.running_var"].dtype == np.float32
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 247
