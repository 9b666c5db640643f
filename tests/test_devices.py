"""The GPU path, tested without a GPU: the device list is injected (``visible_gpus``), and a real process with
``CUDA_VISIBLE_DEVICES=""`` takes today's CPU path. Mixed precision runs on TensorFlow, close to float32."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from pipeline.features import devices, engines
from pipeline.features.backbones.build import build_feature_model
from pipeline.features.devices import extraction_batch_size, gpu_batch_size
from pipeline.features.engines import TensorFlowEngine, make_engine
from pipeline.features.probes import max_relative_diff
from pipeline.utils.config import BackboneConfig

FAKE_GPU = ["/physical_device:GPU:0"]


@pytest.fixture(scope="module")
def lite64():
    return build_feature_model(BackboneConfig(image_size=64))


def test_gpu_batch_size_follows_the_input_size():
    assert [gpu_batch_size(s) for s in (32, 224, 240, 299, 331, 384, 456, 600, 2000)] == [
        256, 128, 64, 64, 32, 32, 16, 16, 8,
    ]  # fmt: skip


def test_the_batch_grows_on_a_gpu_unless_the_user_set_it(monkeypatch):
    monkeypatch.setattr(devices, "visible_gpus", lambda: FAKE_GPU)
    assert extraction_batch_size("auto", 224, 32, given=False) == 128
    assert extraction_batch_size("tensorflow", 299, 32, given=False) == 64
    assert extraction_batch_size("auto", 224, 32, given=True) == 32  # the user's choice
    assert extraction_batch_size("tflite", 224, 32, given=False) == 32  # TFLite runs on the CPU
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    assert extraction_batch_size("auto", 224, 32, given=False) == 32


def test_auto_runs_tensorflow_on_a_gpu_without_converting(lite64, tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "visible_gpus", lambda: FAKE_GPU)
    before = engines.conversions
    engine = make_engine(lite64, "auto", 0, str(tmp_path), images=10_000)
    assert isinstance(engine, TensorFlowEngine) and engine.gpu and "GPU" in engine.why
    assert engines.conversions == before and not (tmp_path / "engines").exists()
    assert make_engine(lite64, "tflite", 0, str(tmp_path)).name == "tflite"  # explicit: stays on the CPU


def test_a_batch_that_does_not_fit_is_halved_with_the_same_features(lite64, capsys):
    import tensorflow as tf

    engine = TensorFlowEngine(lite64, gpu=True)
    x = np.random.default_rng(0).uniform(0, 255, (10, 64, 64, 3)).astype(np.float32)
    want = engine(x)
    run = engine._run
    sizes: list[int] = []

    def small_device(batch):
        sizes.append(len(batch))
        if len(batch) > 3:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return run(batch)

    engine._run = small_device
    got = engine(x)
    assert engine.chunk == 2 and sizes[:2] == [10, 5] and sum(sizes[2:]) == 10
    assert "a batch of 5 images does not fit" in capsys.readouterr().err
    for layer in lite64.layers:
        np.testing.assert_allclose(got[layer], want[layer], rtol=0, atol=1e-5)


def test_mixed_precision_runs_on_tensorflow_close_to_float32(lite64, tmp_path):
    mixed = build_feature_model(BackboneConfig(image_size=64), "mixed_float16")
    engine = make_engine(mixed, "auto", 0, str(tmp_path), images=10_000)
    assert isinstance(engine, TensorFlowEngine) and not (tmp_path / "engines").exists()
    x = np.random.default_rng(1).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    got, want = engine(x), TensorFlowEngine(lite64)(x)
    layer = lite64.layers[0]
    assert got[layer].dtype == np.float32
    diff = max_relative_diff(got[layer], want[layer])
    print(f"mixed_float16 vs float32: max relative difference {diff:.2e}")
    assert 0 < diff < 0.05
    with pytest.raises(Exception, match="mixed_float16 runs on TensorFlow"):
        make_engine(mixed, "tflite", 0, str(tmp_path))


def test_no_visible_gpu_is_todays_cpu_path(tmp_path):
    """A real process with ``CUDA_VISIBLE_DEVICES=""``: no GPU, and ``auto`` decides as it always did."""
    code = (
        "from pipeline.features.devices import visible_gpus, extraction_batch_size\n"
        "from pipeline.features.backbones.build import build_feature_model\n"
        "from pipeline.features.engines import make_engine\n"
        "from pipeline.utils.config import BackboneConfig\n"
        "fm = build_feature_model(BackboneConfig(image_size=64))\n"
        f"e = make_engine(fm, 'auto', 0, {str(tmp_path)!r}, images=10)\n"
        "print(visible_gpus(), extraction_batch_size('auto', 224, 32, False), e.name, e.gpu, e.why)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == (
        "[] 32 tensorflow False auto: 10 images, under 500: converting to TFLite would not pay back"
    )
