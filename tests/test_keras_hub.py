"""KerasHub backbones (DINOv2, DINOv3, SigLIP, CLIP, ViT) through every stage.

Each family is a tiny random-weight model (2 blocks, width 32, 32-px images) saved once with KerasHub's own
``save_to_preset`` (backbone and image converter) and named by its folder: the code path of a downloaded
preset. Features are checked against KerasHub's own converter + backbone + the same pooling, computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError

keras_hub = pytest.importorskip("keras_hub")

S = 32
IMAGENET = {
    "scale": [1 / (255 * s) for s in (0.229, 0.224, 0.225)],
    "offset": [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)],
}
HALF = {"scale": 1 / 127.5, "offset": -1.0}
FAMILIES = ("dinov2", "dinov3", "siglip", "clip", "vit")
SMALL = {"hidden_dim": 32, "num_layers": 2, "num_heads": 2}


def _backbone(family: str):
    m = keras_hub.models
    if family == "dinov2":
        shape = {"image_shape": (S, S, 3), "position_embedding_shape": (S, S, 3)}
        return m.DINOV2Backbone(patch_size=8, intermediate_dim=64, num_register_tokens=1, **shape, **SMALL)
    if family == "dinov3":
        return m.DINOV3Backbone(patch_size=8, intermediate_dim=64, image_shape=(S, S, 3), **SMALL)
    if family == "vit":
        return m.ViTBackbone(image_shape=(S, S, 3), patch_size=8, mlp_dim=64, **SMALL)
    text = {"vocabulary_size": 16, "embedding_dim": 32, "hidden_dim": 32, "num_layers": 1, "num_heads": 2}
    text.update(intermediate_dim=64, max_sequence_length=8)
    if family == "siglip":
        vision = m.SigLIPVisionEncoder(patch_size=8, intermediate_dim=64, image_shape=(S, S, 3), **SMALL)
        return m.SigLIPBackbone(vision, m.SigLIPTextEncoder(**text))
    vision = m.CLIPVisionEncoder(patch_size=8, intermediate_dim=64, image_shape=(S, S, 3), **SMALL)
    return m.CLIPBackbone(vision, m.CLIPTextEncoder(**text), projection_dim=16)


CONVERTERS = {"dinov2": "DINOV2", "dinov3": "DINOV3", "siglip": "SigLIP", "clip": "CLIP", "vit": "ViT"}


def save_preset(folder: Path, family: str, seed: int = 0, norm: dict | None = None) -> Path:
    import keras

    keras.utils.set_random_seed(seed)
    _backbone(family).save_to_preset(str(folder))
    converter = getattr(keras_hub.layers, f"{CONVERTERS[family]}ImageConverter")
    norm = norm or (IMAGENET if family.startswith("dino") else HALF)
    converter(image_size=(S, S), **norm).save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """The five presets, and a two-class folder of 32-px PNGs (already at the input size)."""
    root = tmp_path_factory.mktemp("hub")
    presets = {f: save_preset(root / f"tiny_{f}", f) for f in FAMILIES}
    rng = np.random.default_rng(0)
    images = root / "images"
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        for i in range(8):
            base = rng.integers(0, 256, (S, S, 3)) if c == "a" else np.full((S, S, 3), 40 + 20 * i)
            pixels = np.clip(base + rng.normal(0, 20, (S, S, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / c / f"{c}{i}.png")
    return {"root": root, "presets": presets, "images": images}


def _overrides(hub: dict, family: str, cache: str, **extra) -> dict:
    return {
        "data.source": str(hub["images"]),
        "backbone.name": str(hub["presets"][family]),
        "extract.cache_dir": str(hub["root"] / cache),
        "extract.batch_size": 8,
        "extract.progress": False,
        "data.val_fraction": "0.25",
        "data.test_fraction": "0.25",
        **extra,
    }


def _cached(path: Path) -> tuple[list[str], np.ndarray, dict]:
    from pipeline.cache.store import FeatureCache

    with FeatureCache(path) as c:
        rows = np.arange(len(c.keys))
        return list(c.keys), c.features(None, rows), dict(c.meta)


def keras_hub_features(folder: Path, images: Path, keys: list[str], pooling: str) -> np.ndarray:
    """KerasHub's own converter + backbone, then ``pooling`` in numpy: the reference."""
    converter = keras_hub.layers.ImageConverter.from_preset(str(folder))
    root = keras_hub.models.Backbone.from_preset(str(folder))
    x = converter(np.stack([np.asarray(Image.open(images / k), np.float32) for k in keys]))
    if pooling == "pooled":
        own = getattr(root, "get_vision_embeddings", None)
        return np.asarray(own(x) if own else root.vision_encoder(x))
    tokens = np.asarray(root({k: x for k in root.input} if isinstance(root.input, dict) else x))
    prefix = 1 + getattr(root, "num_register_tokens", 0)
    cls, mean = tokens[:, 0], tokens[:, prefix:].mean(1)
    return {"cls": cls, "mean": mean, "cls+mean": np.concatenate([cls, mean], 1)}[pooling]


DEFAULT_POOLING = {
    "dinov2": "cls+mean",
    "dinov3": "cls+mean",
    "siglip": "pooled",
    "clip": "pooled",
    "vit": "cls",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_equal_keras_hub_on_both_engines(hub, family):
    """Default pooling per family; TensorFlow ≤ 1e-5, TFLite ≤ 1e-4 relative to KerasHub's own forward pass."""
    from pipeline.stages.extract import extract

    tf_run = extract(
        load_config(None, _overrides(hub, family, f"c-tf-{family}", **{"extract.engine": "tensorflow"}))
    )
    keys, got, meta = _cached(tf_run.path)
    assert meta["pooling"] == DEFAULT_POOLING[family] and meta["backbone"] == f"hub_tiny_{family}"
    want = keras_hub_features(hub["presets"][family], hub["images"], keys, DEFAULT_POOLING[family])
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5

    lite = extract(
        load_config(None, _overrides(hub, family, f"c-lite-{family}", **{"extract.engine": "tflite"}))
    )
    assert lite.engine.startswith("tflite")
    lkeys, lgot, _ = _cached(lite.path)
    order = [lkeys.index(k) for k in keys]
    assert np.abs(lgot[order] - want).max() / np.abs(want).max() <= 1e-4


def test_mean_and_block_layers_in_one_pass(hub):
    """``mean`` leaves CLS and register tokens out; several blocks in one pass; bad names are one line."""
    from pipeline.stages.extract import extract

    ov = _overrides(
        hub, "dinov2", "c-layers", **{"backbone.pooling": "mean", "backbone.layers": "block1,output"}
    )
    from pipeline.cache.store import FeatureCache

    path = extract(load_config(None, ov)).path
    keys, _, meta = _cached(path)
    with FeatureCache(path) as c:
        out, block1 = c.features("output", np.arange(len(keys))), c.features("block1", np.arange(len(keys)))
    assert meta["layers"] == ["block1", "output"] and block1.shape == out.shape == (len(keys), 32)
    assert (
        np.abs(out - keras_hub_features(hub["presets"]["dinov2"], hub["images"], keys, "mean")).max() <= 1e-5
    )
    assert not np.allclose(block1, out)
    for bad, msg in (
        ({"backbone.layers": "block9"}, "has no layer 'block9'"),
        ({"backbone.pooling": "pooled"}, "DINOv2 has no pooled output"),
        ({"backbone.name": str(hub["presets"]["siglip"]), "backbone.pooling": "cls"}, "no CLS token"),
        (
            {"backbone.name": "mobilenet_v2", "backbone.weights": "none", "backbone.layers": ""},
            "for transformer",
        ),
    ):
        with pytest.raises(FeatcacheError, match=msg):
            extract(load_config(None, {**ov, **bad}))


def test_fingerprint_covers_the_preset(hub, tmp_path):
    """Another preset, its re-seeded weights, or another converter: another cache. The same folder copied
    elsewhere: the same cache."""
    import shutil

    from pipeline.cache.locate import resolve_cache_path

    def path_of(folder):
        return resolve_cache_path(
            load_config(None, {**_overrides(hub, "dinov2", "c-fp"), "backbone.name": str(folder)})
        )[0]

    base = path_of(hub["presets"]["dinov2"])
    reseeded = save_preset(tmp_path / "tiny_dinov2", "dinov2", seed=1)
    other_norm = save_preset(tmp_path / "b" / "tiny_dinov2", "dinov2", norm=HALF)
    shutil.copytree(hub["presets"]["dinov2"], tmp_path / "copy" / "tiny_dinov2")
    paths = [base, path_of(hub["presets"]["vit"]), path_of(reseeded), path_of(other_norm)]
    assert len(set(paths)) == 4
    assert path_of(tmp_path / "copy" / "tiny_dinov2") == base


@pytest.fixture(scope="module")
def vit_run(hub) -> dict:
    """A ViT cache and a logistic head on it (ViT: its patch embedding needs load_objects to reload)."""
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    ov = _overrides(hub, "vit", "c-run", **{"extract.engine": "tensorflow"})
    extract(load_config(None, ov))
    return {"overrides": ov, "run": train(load_config(None, ov)).run_dir}


def test_rebuilt_model_equals_the_stage2_head_and_predicts(hub, vit_run, tmp_path):
    from pipeline.model.rebuild import equivalence, rebuild
    from pipeline.stages.predict import predict

    rb = rebuild(vit_run["run"])
    names = [layer.name for layer in rb.backbone.layers]
    assert "transformer_block_2" in names and rb.core.get_layer("output_cls") is not None
    eq = equivalence(rb, "val")
    assert eq["n"] >= 3 and eq["max_abs_diff"] <= 1e-4
    rng = np.random.default_rng(7)  # images the cache has never seen: their features are computed
    images = [str(tmp_path / f"new{i}.png") for i in range(2)]
    for p in images:
        Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(p)
    _, results = predict(vit_run["run"], images, top_k=2)
    want = np.asarray(rb.model(np.stack([np.asarray(Image.open(p), np.float32) for p in images])))
    for r, w in zip(results, want, strict=True):
        got = {name: p for _, name, p in r.top}
        assert r.source == "computed" and abs(got["a"] - w[0]) <= 1e-4


def test_finetune_unfreezes_top_blocks_and_exports_a_safe_keras_file(hub, vit_run, tmp_path):
    from pipeline.model.runners import load_keras
    from pipeline.stages.export import export
    from pipeline.stages.finetune import finetune

    ov = {
        **vit_run["overrides"],
        "finetune.run": str(vit_run["run"]),
        "finetune.epochs": "1",
        "finetune.unfreeze": "top:1",
        "finetune.augment": "none",
        "finetune.batch_size": "4",
        "finetune.patience": "0",
        "finetune.keep_worse": "true",
    }
    ft = finetune(load_config(None, ov))
    info = json.loads((ft.run_dir / "metrics.json").read_text())
    unfrozen = json.dumps(info)
    assert "transformer_block_2" in unfrozen and "transformer_block_1" not in unfrozen
    r = export(ft.run_dir, "keras,tflite", tmp_path)
    assert r["ok"], json.dumps(r["formats"], indent=1)
    model = load_keras(r["formats"]["keras"]["path"])  # safe_mode, in this process
    x = np.random.default_rng(1).uniform(0, 255, (2, S, S, 3)).astype(np.float32)
    assert np.allclose(np.asarray(model(x)), np.asarray(load_keras(ft.run_dir / "model.keras")(x)), atol=1e-6)


def test_report_and_audit_of_a_hub_cache(hub, vit_run, tmp_path):
    """The last two stages on a KerasHub backbone: the page names the preset and the run, the audit runs on
    its token features (16 images: its findings are not the point, that it completes is)."""
    from pipeline.stages.audit import audit
    from pipeline.stages.report import report

    cfg = load_config(None, vit_run["overrides"])
    out = tmp_path / "report.html"
    report(cfg, out=out, run=vit_run["run"].name, thumbnails=2, map_rows=16, tsne_rows=0)
    html = out.read_text(encoding="utf-8")
    assert vit_run["run"].name in html and "tiny_vit" in html
    result = audit(cfg, folds=2, write_csv=False)
    assert len(result.to_json()["label_issues"]) <= 16


def test_int8_is_refused_for_a_transformer_in_one_line(hub):
    """Measured: a ViT-S/14-sized transformer runs int8 at 0.38× float32 TFLite here (registry.INT8_REFUSED_HUB)."""
    from pipeline.stages.extract import extract

    with pytest.raises(FeatcacheError, match="does not quantize well to int8"):
        extract(load_config(None, _overrides(hub, "vit", "c-int8", **{"extract.engine": "tflite-int8"})))
    assert not list((hub["root"] / "c-int8").glob("*.h5"))  # refused before any work


def test_cluster_worker_builds_the_preset_from_settings(hub):
    """What a worker runs (features.distributed.run_shard), from the settings a job sends."""
    from pipeline.data.sources import load_dataset
    from pipeline.features.backbones.hub_presets import settle
    from pipeline.features.backbones.registry import get_spec
    from pipeline.features.distributed import ShardSettings, run_shard

    cfg = load_config(None, _overrides(hub, "clip", "c-tf-clip"))
    settle(cfg.backbone, cfg.given, get_spec(cfg.backbone.name).preset)
    ds = load_dataset(cfg.data)
    settings = ShardSettings.make(
        cfg.backbone, "tensorflow", 1, "", 8, "float32", len(ds.samples), "exact", "local:1"
    )
    r = run_shard(settings, 0, ds)
    keys = [ds.samples[i].key for i in r.ids]
    want = keras_hub_features(hub["presets"]["clip"], hub["images"], keys, "pooled")
    assert np.abs(r.features["output"] - want).max() <= 1e-5


def test_offline_download_is_one_line(hub, tmp_path):
    r = run_cli(
        "extract",
        "--data",
        str(hub["images"]),
        "--backbone",
        "hub:dinov2_small",
        "--cache-dir",
        str(tmp_path),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert (
        "hub:dinov2_small" in line
        and "kaggle://keras/dinov2/keras/dinov2_small" in line
        and "--backbone PATH" in line
    )
    from pipeline.features.backbones.hub_presets import read_preset

    for name, msg in (
        ("hf://facebook/dinov2-small", "hf://facebook/dinov2-small"),
        ("hub:dinov2_smal", "did you mean"),
    ):
        with pytest.raises(FeatcacheError, match=msg):
            read_preset(name)
