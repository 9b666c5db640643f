"""``extract.engine=tflite-dynamic``: dynamic-range int8 for KerasHub transformers, gated on the train images.

A tiny ViT is *trained* here for a few seconds on Fashion-MNIST (real weights with real activation ranges,
which random weights lack) and saved with KerasHub's own ``save_to_preset``; the same Fashion-MNIST sample is
extracted with float32 TFLite and with the dynamic-range engine, and a logistic probe is fitted on each cache.
Also: the dynamic cache is its own file (engine in the fingerprint), its gate figures are in the cache,
a rerun converts and measures nothing again, stages select it by ``extract.engine``, predict of a stage-2 run
computes new features with the same model, a cluster worker runs the driver's model, a CNN is refused in one
line, a gate below its floor refuses in one line with the figures, and a float extraction of a transformer
says in one line that the engine exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from pipeline.cache.store import FeatureCache
from pipeline.features import engines, fidelity
from pipeline.stages.extract import extract
from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError

keras_hub = pytest.importorskip("keras_hub")

S = 32  # the ViT's input: Fashion-MNIST's 28 px, enlarged as extraction enlarges them
LIMIT = 2000  # Fashion-MNIST images extracted (lowest key hash: ~1,700 train/val, ~300 official test)


def train_vit(folder: Path, n: int = 4000, epochs: int = 3) -> Path:
    """A 4-layer ViT (patch 8, width 64) trained on ``n`` official-train Fashion-MNIST images, saved as a
    KerasHub preset with its image converter (x / 127.5 - 1, as the training saw)."""
    import keras
    import tensorflow as tf

    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    keras.utils.set_random_seed(0)
    ds = load_dataset(DataConfig(source="fashion_mnist"))
    rows = [s for s in ds.samples if s.key.startswith("train/")][:n]
    x = ds.arrays[[s.index for s in rows]].astype(np.float32)[..., None]
    y = np.asarray([ds.class_names.index(s.label) for s in rows])
    x = tf.image.resize(tf.repeat(x, 3, axis=-1), (S, S)).numpy() / 127.5 - 1.0
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(S, S, 3), patch_size=8, hidden_dim=64, num_layers=4, num_heads=4, mlp_dim=128
    )
    inputs = keras.Input((S, S, 3))
    logits = keras.layers.Dense(10)(backbone(inputs)[:, 0])
    model = keras.Model(inputs, logits)
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    backbone.save_to_preset(str(folder))
    converter = keras_hub.layers.ViTImageConverter(image_size=(S, S), scale=1 / 127.5, offset=-1.0)
    converter.save_to_preset(str(folder))
    return folder


def _config(root: Path, preset: Path, engine: str, **extra) -> dict:
    return {
        "data.source": "fashion_mnist",
        "data.limit": LIMIT,
        "backbone.name": str(preset),
        "extract.cache_dir": str(root / "cache"),
        "extract.engine": engine,
        "extract.batch_size": 64,
        "extract.progress": False,
        **extra,
    }


def probe_accuracy(path: Path) -> float:
    """A logistic probe fitted on the cache's train rows, its accuracy on the test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    with FeatureCache(path) as c:
        x, y, split = c.features(), np.asarray(c.labels), np.asarray(c.split)
    scale = StandardScaler().fit(x[split == 0])
    head = LogisticRegression(max_iter=2000).fit(scale.transform(x[split == 0]), y[split == 0])
    return float(head.score(scale.transform(x[split == 2]), y[split == 2]))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """The trained preset, its float32 (tflite) cache and its dynamic-range cache of the same images."""
    root = tmp_path_factory.mktemp("dynamic")
    preset = train_vit(root / "trained_vit")
    float32 = extract(load_config(None, _config(root, preset, "tflite")))
    before = engines.conversions
    dynamic = extract(load_config(None, _config(root, preset, "tflite-dynamic")))
    return {
        "root": root,
        "preset": preset,
        "float32": float32,
        "dynamic": dynamic,
        "conversions": engines.conversions - before,
    }


def test_a_trained_vit_keeps_its_features_and_probe_accuracy_on_the_dynamic_engine(vit):
    f32, dyn = vit["float32"], vit["dynamic"]
    assert vit["conversions"] == 1 and dyn.engine == "tflite-dynamic" and "on tflite-dynamic" in dyn.summary()
    assert dyn.path != f32.path and dyn.path.parent == f32.path.parent  # never mixed with float rows
    with FeatureCache(f32.path) as a, FeatureCache(dyn.path) as b:
        assert a.keys == b.keys and "engine" not in a.meta["feature_key"]
        assert b.meta["feature_key"]["engine"] == {"name": "tflite-dynamic", "recipe": 1}
        gate = b.meta["engine_fidelity"]
        assert "engine_fidelity" not in a.meta
        x, y = a.features().astype(np.float64), b.features().astype(np.float64)
    train = int((np.asarray(b.split) == 0).sum())
    assert gate["images"] == min(train, 32) and gate["floor"] == [
        fidelity.MIN_MEAN_COSINE,
        fidelity.MIN_COSINE,
    ]
    cos = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    acc_f32, acc_dyn = probe_accuracy(f32.path), probe_accuracy(dyn.path)
    print(
        f"\ntrained ViT, Fashion-MNIST ({len(cos)} images): dynamic vs float32 cosine mean {cos.mean():.5f} "
        f"min {cos.min():.5f}; gate on {gate['images']} train images: mean {gate['mean_cosine']:.5f} min "
        f"{gate['min_cosine']:.5f}; probe accuracy float32 {acc_f32:.4f}, dynamic {acc_dyn:.4f} "
        f"({100 * (acc_f32 - acc_dyn):+.2f} points lost)"
    )
    assert not np.array_equal(x, y) and cos.mean() >= fidelity.MIN_MEAN_COSINE
    assert gate["mean_cosine"] >= fidelity.MIN_MEAN_COSINE and gate["min_cosine"] >= fidelity.MIN_COSINE
    assert acc_f32 > 0.6  # the ViT learned something: the check below is about a trained model
    assert abs(acc_f32 - acc_dyn) <= 0.01


def test_a_rerun_converts_and_measures_nothing_and_stages_select_the_dynamic_cache(vit, monkeypatch):
    from pipeline.cache.locate import select_cache

    cfg = _config(vit["root"], vit["preset"], "tflite-dynamic")
    (sidecar,) = (vit["root"] / "cache" / "engines").glob("*-dynamic-int8.json")
    assert len(json.loads(sidecar.read_text())["gates"]) == 1
    monkeypatch.setattr(fidelity, "measure", lambda *a: pytest.fail("the gate measured again"))
    before = engines.conversions
    again = extract(load_config(None, cfg), rebuild=True)
    assert again.path == vit["dynamic"].path and engines.conversions == before
    with FeatureCache(again.path) as c, FeatureCache(vit["dynamic"].path) as d:
        assert c.meta["engine_fidelity"] == d.meta["engine_fidelity"]
    picked = {e: select_cache(load_config(None, _config(vit["root"], vit["preset"], e))).path for e in
              ("tflite-dynamic", "tflite", "auto")}  # fmt: skip
    assert picked == {
        "tflite-dynamic": again.path,
        "tflite": vit["float32"].path,
        "auto": vit["float32"].path,
    }
    with pytest.raises(FeatcacheError, match="no cache"):
        select_cache(load_config(None, _config(vit["root"], vit["preset"], "tflite-int8")))


def test_predict_on_a_run_of_a_dynamic_cache_computes_with_the_same_model(vit, tmp_path, monkeypatch):
    """Images not in the cache are computed by the cache's own dynamic-range model: a cached image, given
    as new pixels (a PNG file), gets its cached row's probabilities."""
    from PIL import Image

    from pipeline.data.sources import load_dataset
    from pipeline.stages.predict import predict
    from pipeline.stages.train import train
    from pipeline.utils.config import DataConfig

    cfg = _config(vit["root"], vit["preset"], "tflite-dynamic", **{"train.cache": str(vit["dynamic"].path)})
    run = train(load_config(None, cfg)).run_dir
    ds = load_dataset(DataConfig(source="fashion_mnist", limit=LIMIT))
    png = tmp_path / "one.png"
    Image.fromarray(ds.arrays[ds.samples[0].index]).save(png)
    used: list[str] = []
    call = engines.TFLiteEngine.__call__
    monkeypatch.setattr(
        engines.TFLiteEngine, "__call__", lambda self, x: used.append(self.name) or call(self, x)
    )
    before = engines.conversions
    _, (result,) = predict(run, [str(png)], top_k=3)
    assert result.source == "computed" and used == ["tflite-dynamic"] and engines.conversions == before


def test_a_cluster_worker_runs_the_drivers_dynamic_model(vit):
    """What the cluster path runs (features.distributed): the driver converts and gates once, the worker builds
    an engine from the flatbuffer it is sent, converts nothing, and equals one process bit for bit."""
    from pipeline.data.sources import load_dataset
    from pipeline.features.backbones.hub_presets import settle
    from pipeline.features.backbones.registry import get_spec
    from pipeline.features.calibration import for_config
    from pipeline.features.distributed import ShardSettings, quantized_model, run_shard, shard_dataset

    cfg = load_config(None, _config(vit["root"], vit["preset"], "tflite-dynamic"))
    settle(cfg.backbone, cfg.given, get_spec(cfg.backbone.name).preset)
    ds = load_dataset(cfg.data)
    x = cfg.extract
    settings = ShardSettings.make(
        cfg.backbone, x.engine, 1, x.cache_dir, 64, "float32", 64, "exact", "local:1"
    )
    before = engines.conversions
    model = quantized_model(settings, for_config(cfg, ds))
    r = run_shard(settings, 0, shard_dataset(ds, ds.samples[:64]), model)
    assert engines.conversions == before and r.engine == "tflite-dynamic"
    assert r.fidelity["mean_cosine"] >= fidelity.MIN_MEAN_COSINE
    with FeatureCache(vit["dynamic"].path) as c:
        rows = {k: i for i, k in enumerate(c.keys)}
        want = c.features(None, np.asarray([rows[ds.samples[i].key] for i in r.ids]))
    np.testing.assert_array_equal(r.features[c.layers[0]], want)


def test_a_gate_below_its_floor_refuses_in_one_line_with_the_figures(vit, monkeypatch):
    monkeypatch.setattr(fidelity, "MIN_MEAN_COSINE", 1.0)  # a floor no quantized model reaches
    cfg = _config(
        vit["root"], vit["preset"], "tflite-dynamic", **{"extract.cache_dir": str(vit["root"] / "c2")}
    )
    (vit["root"] / "c2" / "engines").mkdir(parents=True)
    for f in (vit["root"] / "cache" / "engines").glob("*-dynamic-int8.*"):  # the converted model, reused
        (vit["root"] / "c2" / "engines" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FeatcacheError, match=r"too far from float32's on \d+ of the dataset's train images "
                       r"\(cosine mean 0\.9\d+, min 0\.9\d+; the floor is 1\.0 / 0\.98\)") as e:  # fmt: skip
        extract(load_config(None, cfg))
    assert "\n" not in str(e.value) and not list((vit["root"] / "c2").glob("*.h5"))


def test_a_cnn_is_refused_in_one_line_and_a_float_transformer_extraction_hints(vit, tmp_path):
    r = run_cli(
        "extract", "--data", "fashion_mnist", "--limit", "50", "--cache-dir", str(tmp_path),
        "--set", "extract.engine=tflite-dynamic", "--quiet",
    )  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if x.startswith("featcache:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "efficientnet_lite0 runs slower with dynamic-range int8" in lines[0]
    assert "0.40×" in lines[0] and not list(tmp_path.glob("*.h5"))
    r = run_cli(
        "extract", "--data", "fashion_mnist", "--limit", "40", "--cache-dir", str(tmp_path),
        "--backbone", str(vit["preset"]), "--set", "extract.engine=tflite",
    )  # fmt: skip
    hints = [x for x in (r.stdout + r.stderr).splitlines() if "hint:" in x]
    assert r.returncode == 0 and len(hints) == 1 and "extract.engine=tflite-dynamic" in hints[0], r.stderr


def test_compare_candidates_take_the_dynamic_engine_and_a_refused_one_is_named_first(vit):
    """``compare --set extract.engine=tflite-dynamic``: the transformer's dynamic cache (complete: reused, no
    model built) is probed; with a CNN candidate beside it, the CNN is named before any extraction."""
    import pipeline

    kw = {
        "data": "fashion_mnist",
        "limit": LIMIT,
        "cache_dir": str(vit["root"] / "cache"),
        "extract__engine": "tflite-dynamic",
        "extract__progress": False,
        "shots": [],
    }
    result = pipeline.compare(backbones=str(vit["preset"]), **kw)
    (row,) = result.rows
    assert Path(row["cache"]) == vit["dynamic"].path and row["test_accuracy"] > 0.6 and not row["extracted"]
    before = len(list((vit["root"] / "cache").glob("*.h5")))
    with pytest.raises(FeatcacheError, match="efficientnet_lite0.*runs slower with dynamic-range int8"):
        pipeline.compare(backbones=f"{vit['preset']},efficientnet_lite0", **kw)
    assert len(list((vit["root"] / "cache").glob("*.h5"))) == before
