"""Extraction engines: TFLite (LiteRT + XNNPACK) gives the Keras model's features, and ``auto`` falls back cleanly.

Every backbone family the tests cover is converted, then compared with the Keras model on crops of real
photos (scikit-learn's sample images, not the crops the engine validated itself on): the largest relative
difference per layer, ``max|tflite - keras| / max|keras|``, must be ≤ 1e-4.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from conftest import small_config

from pipeline.cache.store import FeatureCache
from pipeline.features import engines, tflite
from pipeline.features.backbones.build import build_feature_model
from pipeline.features.engines import (
    FEATURE_TOLERANCE,
    EngineUnavailable,
    TensorFlowEngine,
    TFLiteEngine,
    load_or_convert,
    make_engine,
)
from pipeline.features.probes import max_relative_diff
from pipeline.features.tflite import micro_batch_for
from pipeline.stages.extract import extract
from pipeline.utils.config import BackboneConfig, load_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.workers import usable_cores


def real_crops(size: int, n: int = 6, seed: int = 1) -> np.ndarray:
    """``n`` random crops of the two sample photos, resized with the pipeline's own resize (raw 0..255)."""
    from sklearn.datasets import load_sample_images

    from pipeline.data.preprocess import resize_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = []
    for i in range(n):
        p = photos[i % 2]
        h, w = int(rng.integers(80, 400)), int(rng.integers(80, 600))
        y, x = int(rng.integers(0, p.shape[0] - h)), int(rng.integers(0, p.shape[1] - w))
        out.append(np.asarray(resize_images(np.ascontiguousarray(p[y : y + h, x : x + w]), size)))
    return np.stack(out).astype(np.float32)


def keras_features(fm, x) -> dict[str, np.ndarray]:
    out = fm.model(x, training=False)
    return {layer: np.asarray(out[layer]) for layer in fm.layers}


# Backbones the engine is checked on: the default with its real ImageNet weights, and other families
# (different preprocessing, ops and several cut layers) with random weights at a small size for speed.
BACKBONES = [
    pytest.param(BackboneConfig(), id="efficientnet_lite0-imagenet-224"),
    pytest.param(
        # block_4_add and block_5_add have the same shape: the mapping must be by name, not by shape.
        BackboneConfig(
            name="mobilenet_v2",
            weights="none",
            image_size=96,
            layers=["block_4_add", "block_5_add", "out_relu"],
        ),
        id="mobilenet_v2-3layers-96",
    ),
    pytest.param(BackboneConfig(name="resnet50", weights="none", image_size=96), id="resnet50-caffe-96"),
    pytest.param(
        BackboneConfig(name="efficientnet_b0", weights="none", image_size=64, pooling="max"),
        id="efficientnet_b0-max-64",
    ),
]


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


MNV2 = BackboneConfig(name="mobilenet_v2", weights="none", image_size=64)


@pytest.fixture(scope="module")
def mnv2():
    """A small feature model for the engine's mechanics (its features are checked above)."""
    return build_feature_model(MNV2)


@pytest.fixture(scope="module")
def mnv2_engine(mnv2, engine_cache):
    return load_or_convert(mnv2, 0, engine_cache, verbose=False)[0]


@pytest.mark.parametrize("cfg", BACKBONES)
def test_tflite_features_match_keras_on_real_photos(cfg, engine_cache):
    fm = build_feature_model(cfg)
    engine, meta = load_or_convert(fm, 0, engine_cache, verbose=False)
    assert meta["ok"] and meta["delegated"], meta  # XNNPACK took the graph
    x = real_crops(fm.image_size)
    got, want = engine(x), keras_features(fm, x)
    diffs = {layer: max_relative_diff(got[layer], want[layer]) for layer in fm.layers}
    print(f"{fm.spec.name}: max relative difference vs Keras {diffs}")
    assert set(got) == set(fm.layers)
    for layer in fm.layers:
        assert got[layer].shape == (len(x), fm.dims[layer]) and got[layer].dtype == np.float32
        assert diffs[layer] <= FEATURE_TOLERANCE, (layer, diffs)
    if len(fm.layers) > 1:  # a swapped mapping would be caught: different layers really differ
        a, b = fm.layers[0], fm.layers[1]
        if want[a].shape == want[b].shape:
            assert max_relative_diff(got[a], want[b]) > 100 * FEATURE_TOLERANCE


def test_any_batch_size_gives_the_same_features(mnv2, mnv2_engine):
    """Micro-batching and the smaller last batch (an input resize) do not change a feature."""
    fm, engine = mnv2, mnv2_engine
    x = real_crops(64, n=11)
    full = engine(x)[fm.layers[0]]
    for threads, micro in ((1, 1), (2, 1), (1, 3), (2, 4), (1, 32)):  # XNNPACK: bit for bit
        e = TFLiteEngine(engine.source, fm.layers, engine.output_names, threads, micro_batch=micro)
        assert np.array_equal(e(x)[fm.layers[0]], full), (threads, micro)
    parts = [engine(x[i:j])[fm.layers[0]] for i, j in ((0, 1), (1, 8), (8, 11))]
    assert np.array_equal(np.concatenate(parts), full)
    assert engine(x[:0])[fm.layers[0]].shape == (0, fm.dims[fm.layers[0]])
    any_float = x[:3].astype(np.float64)
    assert engine(any_float)[fm.layers[0]].shape == (3, fm.dims[fm.layers[0]])
    with pytest.raises(FeatcacheError, match="expected an N×64×64×3 batch"):
        engine(np.zeros((2, 32, 32, 3), np.float32))


def test_invoke_releases_the_gil(mnv2_engine):
    """Decode (tf.data) and the HDF5 writer thread can run while the interpreter computes."""
    engine = TFLiteEngine(mnv2_engine.source, mnv2_engine.layers, mnv2_engine.output_names, threads=1)
    x = np.repeat(real_crops(64, n=2), 32, axis=0)
    engine(x)
    ticks, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            engine(x)  # the main thread is inside invoke() most of this time
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        t.join()
    # With the GIL held during invoke the spinner could only tick between calls.
    assert ticks[0] > 0.3 * elapsed / 0.0011, (ticks[0], elapsed)


def test_threads_default_to_all_cores_and_are_configurable(mnv2, mnv2_engine, engine_cache):
    fm = mnv2
    assert make_engine(fm, "tflite", 0, str(engine_cache)).threads == usable_cores()
    assert make_engine(fm, "tflite", 1, str(engine_cache)).threads == 1
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_micro_batch_is_about_one_image_per_thread(mnv2, mnv2_engine):
    fm = mnv2
    for threads, chunk in ((1, 1), (2, 2), (3, 3), (4, 4), (16, 4)):
        assert micro_batch_for(threads) == chunk
        e = TFLiteEngine(mnv2_engine.source, fm.layers, mnv2_engine.output_names, threads)
        assert (e.threads, e.micro_batch) == (threads, chunk)
    assert TFLiteEngine(mnv2_engine.source, fm.layers, mnv2_engine.output_names, 1, 8).micro_batch == 8


def test_converted_model_is_cached_and_keyed_by_the_feature_model(mnv2, tmp_path, capsys):
    cfg, fm = MNV2, mnv2
    before = engines.conversions
    e1, meta = load_or_convert(fm, 0, tmp_path)
    path = tmp_path / "engines" / os.path.basename(meta["path"])
    assert path.is_file() and path.name.startswith("mobilenet_v2-") and path.suffix == ".tflite"
    assert path.with_suffix(".json").is_file()
    assert "converted mobilenet_v2 to TFLite" in capsys.readouterr().err
    mtime = path.stat().st_mtime_ns
    e2, meta2 = load_or_convert(build_feature_model(cfg), 0, tmp_path)
    assert engines.conversions == before + 1 and path.stat().st_mtime_ns == mtime  # reused, not redone
    assert meta2["max_relative_diff"] == meta["max_relative_diff"]
    assert capsys.readouterr().err == ""
    x = real_crops(64, n=3)
    np.testing.assert_array_equal(e1(x)[fm.layers[0]], e2(x)[fm.layers[0]])
    # Anything that changes a feature gets its own converted model.
    for change in ({"pooling": "max"}, {"image_size": 96}, {"layers": ["block_5_add"]}):
        other = engines.engine_paths(
            build_feature_model(BackboneConfig(**{**vars(cfg), **change})), tmp_path
        )[0]
        assert other != path, change
    assert not list((tmp_path / "engines").glob("*.tmp*"))
    path.write_bytes(b"not a flatbuffer")  # a damaged cached model is replaced, not trusted
    e3, _ = load_or_convert(fm, 0, tmp_path, verbose=False)
    assert engines.conversions == before + 2
    np.testing.assert_array_equal(e3(x)[fm.layers[0]], e1(x)[fm.layers[0]])


def test_extract_with_tflite_matches_tensorflow_and_reuses_the_conversion(photo_folder, tmp_path):
    def run(cache, engine, **kw):
        cfg = small_config(cache, photo_folder, **{"backbone.image_size": 128, "extract.engine": engine})
        return extract(load_config(None, cfg), **kw)

    ref = run(tmp_path / "tf", "tensorflow")
    before = engines.conversions
    lite = run(tmp_path / "lite", "tflite")
    assert (ref.engine, lite.engine) == ("tensorflow", "tflite")
    assert "images/s on tflite (" in lite.summary() and "images/s on tensorflow (" in ref.summary()
    assert lite.path.name == ref.path.name  # the engine is not in the fingerprint: same cache identity
    assert engines.conversions == before + 1
    with FeatureCache(ref.path) as a, FeatureCache(lite.path) as b:
        assert a.keys == b.keys and a.ids == b.ids and b.meta["engine"] == "tflite"
        assert a.meta["engine"] == "tensorflow"
        diff = max_relative_diff(b.features(), a.features())
    print(f"extract tflite vs tensorflow: max relative difference {diff:.2e}")
    assert diff <= FEATURE_TOLERANCE
    (model,) = (tmp_path / "lite" / "engines").glob("*.tflite")
    mtime = model.stat().st_mtime_ns
    again = run(tmp_path / "lite", "tflite", rebuild=True)
    assert again.extracted == lite.extracted and again.engine == "tflite"
    assert engines.conversions == before + 1 and model.stat().st_mtime_ns == mtime  # no reconversion


def test_auto_uses_tflite_when_it_is_faster(mnv2, tmp_path, monkeypatch):
    fm = mnv2
    _, meta = load_or_convert(fm, 0, tmp_path, verbose=False)
    monkeypatch.setattr(engines, "AUTO_MIN_SPEEDUP", 0.0)
    assert make_engine(fm, "auto", 0, str(tmp_path)).name == "tflite"
    assert make_engine(fm, "auto", 0, str(tmp_path), images=10).name == "tflite"  # already converted
    monkeypatch.setattr(engines, "AUTO_MIN_SPEEDUP", 1e9)  # "TFLite measured slower here"
    assert make_engine(fm, "auto", 0, str(tmp_path)).name == "tensorflow"
    assert meta["speedup"] > 0 and meta["tflite_images_per_s"] > 0


def test_auto_does_not_convert_for_a_small_job(mnv2, tmp_path, monkeypatch):
    before = engines.conversions
    assert (
        make_engine(mnv2, "auto", 0, str(tmp_path), images=engines.AUTO_MIN_IMAGES - 1).name == "tensorflow"
    )
    assert engines.conversions == before and not (tmp_path / "engines").exists()
    monkeypatch.setattr(engines, "AUTO_MIN_SPEEDUP", 0.0)
    assert make_engine(mnv2, "auto", 0, str(tmp_path), images=engines.AUTO_MIN_IMAGES).name == "tflite"
    assert engines.conversions == before + 1


def test_auto_falls_back_when_conversion_fails_and_remembers(mnv2, tmp_path, monkeypatch, capsys):
    fm = mnv2
    calls = []

    def broken(fm, quantize="none"):
        calls.append(1)
        raise RuntimeError("op FANCY_OP is neither a custom op nor a flex op")

    monkeypatch.setattr(engines, "convert", broken)
    e = make_engine(fm, "auto", 0, str(tmp_path))
    assert e.name == "tensorflow"
    err = capsys.readouterr().err
    assert "engine auto: using tensorflow" in err and "FANCY_OP" in err and len(err.strip().splitlines()) == 1
    assert make_engine(fm, "auto", 0, str(tmp_path)).name == "tensorflow"
    assert len(calls) == 1  # the failure is remembered: auto does not retry it on every run
    with pytest.raises(FeatcacheError, match="TFLite conversion of mobilenet_v2 failed: op FANCY_OP"):
        make_engine(fm, "tflite", 0, str(tmp_path))  # explicit tflite retries, and says why it cannot
    assert len(calls) == 2


def test_auto_falls_back_when_the_runtime_fails(mnv2, tmp_path, monkeypatch, capsys):
    def broken(engine, reference, images):
        raise RuntimeError("Encountered unresolved custom op: Foo")

    monkeypatch.setattr(engines, "compare", broken)
    assert make_engine(mnv2, "auto", 0, str(tmp_path)).name == "tensorflow"
    assert "the TFLite runtime cannot run converted mobilenet_v2" in capsys.readouterr().err


def test_auto_falls_back_when_features_differ(mnv2, tmp_path, monkeypatch, capsys):
    fm = mnv2
    monkeypatch.setattr(engines, "FEATURE_TOLERANCE", 0.0)  # any float difference now "fails"
    assert make_engine(fm, "auto", 0, str(tmp_path)).name == "tensorflow"
    assert "differ from TensorFlow's by" in capsys.readouterr().err
    with pytest.raises(EngineUnavailable, match="differ from TensorFlow's"):
        make_engine(fm, "tflite", 0, str(tmp_path))
    assert not list((tmp_path / "engines").glob("*.tflite"))  # a model that failed the check is not kept


def test_a_conversion_that_would_not_fit_in_memory_is_refused_not_attempted(
    mnv2, tmp_path, monkeypatch, capsys
):
    avail = tflite.available_memory()
    assert avail is not None and 0 < avail <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # every weight counts, the BatchNorm statistics too: they are frozen into the file as well
    assert tflite.weight_bytes(mnv2.model) == 4 * sum(int(np.prod(w.shape)) for w in mnv2.model.weights)
    # A backbone whose conversion needs more than this machine has (ConvNeXt-XLarge: ~31 GiB).
    factor = tflite.CONVERT_MEMORY_FACTOR
    monkeypatch.setattr(tflite, "CONVERT_MEMORY_FACTOR", 2 * avail / tflite.weight_bytes(mnv2.model))
    before = engines.conversions
    assert make_engine(mnv2, "auto", 0, str(tmp_path)).name == "tensorflow"
    err = capsys.readouterr().err.strip()
    assert "engine auto: using tensorflow (converting mobilenet_v2 to TFLite needs about" in err
    assert "GiB is available" in err and len(err.splitlines()) == 1
    with pytest.raises(EngineUnavailable, match="needs about .* GiB of memory"):
        make_engine(mnv2, "tflite", 0, str(tmp_path))
    assert engines.conversions == before and not (tmp_path / "engines").exists()  # nothing recorded
    monkeypatch.setattr(tflite, "CONVERT_MEMORY_FACTOR", factor)  # memory freed later: converts then
    assert make_engine(mnv2, "tflite", 0, str(tmp_path)).name == "tflite"


def test_unknown_engine_and_tensorflow_engine(mnv2):
    fm = mnv2
    with pytest.raises(FeatcacheError, match="extract.engine must be one of"):
        make_engine(fm, "onnx")
    x = real_crops(64, n=2)
    engine = make_engine(fm, "tensorflow")
    assert isinstance(engine, TensorFlowEngine) and engine.name == "tensorflow"
    assert max_relative_diff(engine(x)[fm.layers[0]], keras_features(fm, x)[fm.layers[0]]) <= 1e-6


def test_max_relative_diff():
    a = np.array([[1.0, -4.0], [2.0, 0.0]], np.float32)
    assert max_relative_diff(a, a) == 0.0
    assert max_relative_diff(a + 0.004, a) == pytest.approx(1e-3)
    assert max_relative_diff(a[:1], a) == float("inf")
    assert max_relative_diff(np.full_like(a, np.nan), a) == float("inf")
