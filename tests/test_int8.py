"""``extract.engine=tflite-int8``: full-integer int8 features, calibrated on the dataset's own train images.

Real EfficientNet-Lite0 weights at 64 px on real photo crops: the int8 cache is its own file (engine and
calibration set in the fingerprint), close to float32 by cosine, reused without reconversion; predict on a
run of it computes new features with the same int8 model; the transformer keeps one int8 model across calls;
a family that does not quantize well is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, small_config, write_photo_folder
from PIL import Image

from pipeline.cache.fingerprint import engine_key
from pipeline.cache.store import FeatureCache
from pipeline.features import engines
from pipeline.stages.extract import extract
from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8") / "photos"
    write_photo_folder(root, per_class=10)
    return root


@pytest.fixture(scope="module")
def caches(photos):
    """The float32 (tflite) and the int8 cache of the same photos, in one cache folder."""
    cache = photos.parent / "cache"
    float32 = extract(load_config(None, small_config(cache, photos, **{"extract.engine": "tflite"})))
    before = engines.conversions
    int8 = extract(load_config(None, small_config(cache, photos, **{"extract.engine": "tflite-int8"})))
    return {"cache": cache, "float32": float32, "int8": int8, "conversions": engines.conversions - before}


def test_int8_extraction_is_its_own_cache_close_to_float32_and_reused(photos, caches):
    f32, i8 = caches["float32"], caches["int8"]
    assert caches["conversions"] == 1 and i8.engine == "tflite-int8" and "on tflite-int8" in i8.summary()
    assert i8.path != f32.path and i8.path.parent == f32.path.parent  # int8 rows never mix with float rows
    with FeatureCache(f32.path) as a, FeatureCache(i8.path) as b:
        assert a.keys == b.keys and a.fingerprint != b.fingerprint
        assert b.meta["engine"] == "tflite-int8" and "engine" not in a.meta["feature_key"]
        part = b.meta["feature_key"]["engine"]
        train = int((np.asarray(b.split) == 0).sum())
        assert part["name"] == "tflite-int8" and part["calibration"]["source"] == "train"
        assert part["calibration"]["images"] == min(train, 32)  # every train image of this small set
        x, y = a.features(), b.features()
        assert y.dtype == np.float32
    cos = cosines(x, y)
    print(f"int8 vs float32 at 64 px: mean cosine {cos.mean():.4f}, min {cos.min():.4f}")
    assert cos.mean() > 0.9 and not np.array_equal(x, y)

    (model,) = (caches["cache"] / "engines").glob("*-int8.tflite")
    mtime, before = model.stat().st_mtime_ns, engines.conversions
    cfg = small_config(caches["cache"], photos, **{"extract.engine": "tflite-int8"})
    hit = extract(load_config(None, cfg))
    assert (hit.path, hit.extracted, hit.reused) == (i8.path, 0, 20)  # a cache hit
    again = extract(load_config(None, cfg), rebuild=True)
    assert again.extracted == 20 and engines.conversions == before and model.stat().st_mtime_ns == mtime
    with FeatureCache(again.path) as c:
        np.testing.assert_array_equal(c.features(), y)  # the same int8 model: the same features


def test_the_calibration_set_is_in_the_fingerprint_and_float_keys_are_unchanged(photos):
    from pipeline.cache.locate import resolve_cache_path

    def key(**extra):
        return resolve_cache_path(load_config(None, small_config(photos.parent, photos, **extra)))[1]

    float_key = key()
    assert key(**{"extract.engine": "tflite"}) == float_key == key(**{"extract.engine": "tensorflow"})
    a, b = (
        key(**{"extract.engine": "tflite-int8"}),
        key(**{"extract.engine": "tflite-int8", "extract.calibration": 4}),
    )
    assert {k: v for k, v in a.items() if k != "engine"} == float_key
    assert a["engine"]["calibration"]["images"] != b["engine"]["calibration"]["images"] == 4
    assert a["engine"]["calibration"]["digest"] != b["engine"]["calibration"]["digest"]
    mixed = key(**{"extract.precision": "mixed_float16"})
    assert mixed == {**float_key, "precision": "mixed_float16"}
    assert engine_key(load_config(None, None), float_key) is float_key


def test_predict_on_a_run_of_an_int8_cache_uses_the_same_int8_model(photos, caches, tmp_path, monkeypatch):
    """A byte-different copy of a cached photo (same pixels) is computed, not looked up: on the int8 model
    it gets the cached row's probabilities; the float32 model would not."""
    from pipeline.stages.predict import predict
    from pipeline.stages.train import train

    cfg = small_config(caches["cache"], photos, **{"train.cache": str(caches["int8"].path)})
    run = train(load_config(None, cfg)).run_dir
    original = sorted((photos / "china").glob("*.png"))[0]
    copy = tmp_path / "copy.png"
    Image.open(original).save(copy, compress_level=1)
    assert copy.read_bytes() != original.read_bytes()
    used: list[str] = []
    call = engines.TFLiteEngine.__call__
    monkeypatch.setattr(
        engines.TFLiteEngine, "__call__", lambda self, x: used.append(self.name) or call(self, x)
    )
    before = engines.conversions
    _, results = predict(run, [str(original), str(copy)], top_k=2)
    assert [r.source for r in results] == ["cache", "computed"]
    assert used == ["tflite-int8"] and engines.conversions == before  # the cached int8 model
    cached, computed = (dict((i, p) for i, _, p in r.top) for r in results)
    assert max(abs(cached[i] - computed[i]) for i in cached) <= 1e-5


def test_a_family_that_does_not_quantize_well_is_refused_in_one_line(photos, tmp_path):
    cfg = small_config(
        tmp_path, photos, **{"backbone.name": "convnext_tiny", "extract.engine": "tflite-int8"}
    )
    with pytest.raises(
        FeatcacheError, match=r"convnext_tiny does not quantize well to int8 \(its int8 model ran"
    ):
        extract(load_config(None, cfg))
    assert not list(tmp_path.glob("*.h5"))
    r = run_cli(
        "extract", "--data", str(photos), "--cache-dir", str(tmp_path), "--backbone", "mobilenet_v3_small",
        "--set", "extract.engine=tflite-int8", "--quiet",
    )  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if x.startswith("featcache:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines == [lines[-1]] and "mobilenet_v3_small does not quantize well to int8" in lines[-1]
    with pytest.raises(FeatcacheError, match="extract.precision=mixed_float16 runs on TensorFlow"):
        load_config(None, {"extract.engine": "tflite-int8", "extract.precision": "mixed_float16"})


def test_a_model_whose_int8_features_collapse_is_refused(tmp_path):
    """Random-weight MobileNetV2's features are ~1e-12: int8 rounds them to zero (cosine 0)."""
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.features.calibration import from_probe
    from pipeline.utils.config import BackboneConfig

    fm = build_feature_model(BackboneConfig(name="mobilenet_v2", weights="none", image_size=64))
    with pytest.raises(
        engines.EngineUnavailable, match="does not quantize well to int8: mean feature cosine"
    ):
        engines.make_engine(fm, "tflite-int8", 0, str(tmp_path), calibration=from_probe(4))
    (meta,) = (tmp_path / "engines").glob("*-int8.json")
    assert json.loads(meta.read_text())["ok"] is False


def test_feature_extractor_keeps_one_int8_model_across_calls(photos, caches, tmp_path):
    from pipeline.transformer import FeatureExtractor

    paths = sorted(str(p) for p in photos.rglob("*.*"))
    fx = FeatureExtractor(image_size=64, cache_dir=str(tmp_path), engine="tflite-int8", batch_size=8)
    first = fx.transform(paths[:12])
    before = engines.conversions
    second = fx.transform(paths[6:])  # other images: the same calibration, the same model, the same rows
    assert engines.conversions == before
    np.testing.assert_array_equal(first[6:], second[:6])
    with FeatureCache(caches["float32"].path) as c:
        row = {k: i for i, k in enumerate(c.keys)}
        want = c.features(None, np.asarray([row[Path(p).relative_to(photos).as_posix()] for p in paths[:12]]))
    assert cosines(first, want).mean() > 0.9
    given = FeatureExtractor(
        image_size=64, cache_dir=str(tmp_path), engine="tflite-int8", calibration=paths[:8]
    )
    assert given.transform(paths[:2]).shape == (2, first.shape[1])


def test_later_stages_pick_the_int8_cache_only_when_asked(photos, caches):
    from pipeline.cache.locate import select_cache

    def pick(**extra):
        return select_cache(load_config(None, small_config(caches["cache"], photos, **extra))).path

    assert pick(**{"extract.engine": "tflite-int8"}) == caches["int8"].path.resolve()
    assert (
        pick(**{"extract.engine": "tflite"})
        == pick(**{"extract.engine": "auto"})
        == caches["float32"].path.resolve()
    )
