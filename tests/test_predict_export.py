"""Stage 3: exports agree with the Keras model, and `featcache predict` works on new images.

Shares the real cache of ``test_finetune.py`` (two classes of real photo crops, 64 px, Lite0 weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_photo_folder
from test_finetune import TOL, finetune_overrides, stage3_setup

from pipeline.utils.config import load_config


@pytest.fixture(scope="module")
def stage3(tmp_path_factory) -> dict:
    return stage3_setup(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def finetuned(stage3) -> Path:
    """A quick fine-tuned run: 1 epoch, head only (what export and predict need is the model file)."""
    from pipeline.stages.finetune import finetune

    ov = finetune_overrides(
        stage3, **{"finetune.epochs": "1", "finetune.unfreeze": "none", "finetune.augment": "none"}
    )
    return finetune(load_config(None, ov)).run_dir


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> Path:
    """Crops the cache has never seen, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("new-images")
    write_photo_folder(root, per_class=2, seed=123, start=500)
    (root / "notes.jpg").write_bytes(b"this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def exported(finetuned, tmp_path_factory) -> dict:
    from pipeline.stages.export import export

    out = tmp_path_factory.mktemp("export")
    return export(finetuned, "all", out)


def test_every_export_matches_keras(exported):
    r = exported
    assert r["ok"], json.dumps(r["formats"], indent=1)
    assert set(r["formats"]) == {
        "keras", "savedmodel", "tflite", "tflite-dynamic", "tflite-int8", "onnx", "embedder"
    }  # fmt: skip
    assert r["eval_split"] == "val" and r["eval_images"] >= 5 and r["keras_accuracy"] is not None
    f = r["formats"]
    assert f["keras"]["max_abs_diff"] <= 1e-6 and f["keras"]["max_abs_diff_raw_size"] <= 1e-6
    assert f["savedmodel"]["max_abs_diff"] <= 1e-5 and f["savedmodel"]["max_abs_diff_raw_size"] <= 1e-5
    assert f["tflite"]["max_abs_diff"] <= 1e-4 and f["onnx"]["max_abs_diff"] <= 1e-4
    # a fine-tuned backbone's embedder matches its Keras backbone (head-only fine-tuning: the cache too)
    assert f.pop("embedder")["min_cosine"] >= 0.999
    for e in f.values():  # each re-scored on the val split, next to the Keras accuracy
        assert Path(e["path"]).exists() and e["bytes"] > 0
        assert e["accuracy"] is not None and e["keras_accuracy"] == r["keras_accuracy"]
        assert e["accuracy_delta"] == pytest.approx(e["accuracy"] - e["keras_accuracy"])
    # quantized files are smaller; int8 calibrated on cache training images still classifies
    assert f["tflite-dynamic"]["bytes"] < f["tflite"]["bytes"] / 2
    assert f["tflite-int8"]["bytes"] < f["tflite"]["bytes"] / 2
    assert f["tflite-int8"]["accuracy"] >= r["keras_accuracy"] - max(0.05, 1 / r["eval_images"]) - 1e-9
    saved = json.loads((Path(f["keras"]["path"]).parent / "export.json").read_text())
    assert saved["class_names"] == ["china", "flower"] and saved["image_size"] == 64
    # a single-label export.json keeps its keys and their order (multi-label runs add task and thresholds)
    assert list(saved) == [
        "run", "run_kind", "class_names", "image_size", "resize", "decode", "eval_split", "eval_images",
        "sample_images", "keras_accuracy", "tolerances", "formats", "ok",
    ]  # fmt: skip
    assert list(saved["formats"]["tflite"]) == [
        "path", "bytes", "input", "max_abs_diff", "max_abs_diff_raw_size", "accuracy", "keras_accuracy",
        "accuracy_delta", "ok", "metadata", "seconds",
    ]  # fmt: skip
    assert saved["tolerances"]["tflite-int8"] == {"accuracy_drop": 0.05}


def test_stage2_run_exports_through_the_rebuilt_model(stage3, tmp_path):
    """A stage-2 run is rebuilt and exported; its TFLite file reproduces the stage-2 head end to end."""
    from pipeline.stages.export import export

    r = export(stage3["run"], "tflite", tmp_path)
    assert r["run_kind"] == "stage2" and r["ok"] and r["formats"]["tflite"]["max_abs_diff"] <= 1e-4


def test_predict_new_images_with_a_stage2_run(stage3, new_images):
    """CLI: new images get features computed, a cached image is read from the cache, a bad file is a row."""

    cached = sorted((stage3["photos"] / "flower").glob("*.jpg"))[0]
    r = run_cli(
        "predict", "--model", str(stage3["run"]), str(new_images), str(cached), "--json", "--top-k", "2"
    )
    assert r.returncode == 2, r.stderr  # one image could not be read
    assert "1 of 6 image(s) could not be read" in r.stderr
    rows = {Path(x["image"]).name: x for x in json.loads(r.stdout)}
    new = sorted(p.name for p in new_images.rglob("*_5*.*"))
    assert len(new) == 4 and set(rows) == {*new, "notes.jpg", cached.name}
    assert rows["notes.jpg"]["error"] and not rows["notes.jpg"]["predictions"]
    assert rows[cached.name]["features"] == "cache"
    for name in new:
        preds = rows[name]["predictions"]
        assert rows[name]["features"] == "computed" and len(preds) == 2
        assert {p["class"] for p in preds} == {"china", "flower"}
        assert sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-6)
        assert preds[0]["class"] == name.split("_")[0]  # real photo crops: the head knows them apart

    # the on-the-fly features give what the rebuilt end-to-end model gives on the same files
    from pipeline.stages.predict import predict

    _, results = predict(stage3["run"], [str(new_images / "china"), str(new_images / "flower")], top_k=2)
    assert_matches_rebuilt_model(stage3["run"], results)


@pytest.mark.slow
def test_predict_on_a_cluster_gives_what_one_process_gives(stage3, new_images):
    """``--cluster local:2``: the new images' features come from two worker processes (extraction's shard
    tasks), the head runs here — the same rows as one process; the unreadable file is still an error row."""
    cached = sorted((stage3["photos"] / "flower").glob("*.jpg"))[0]
    args = ["predict", "--model", str(stage3["run"]), str(new_images), str(cached), "--json", "--top-k", "2"]
    args += ["--batch-size", "2"]  # 5 images to compute: shards at 0, 2 and 4, rows put back by offset
    one, two = run_cli(*args), run_cli(*args, "--cluster", "local:2")
    assert "cluster: a local cluster of 2 workers · dashboard http" in two.stderr
    assert two.returncode == 2 and "1 of 6 image(s) could not be read" in two.stderr, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert [(x["image"], x["features"], bool(x["error"])) for x in a] == [
        (x["image"], x["features"], bool(x["error"])) for x in b
    ]
    assert sum(x["features"] == "computed" for x in b) == 4
    for x, y in zip(a, b, strict=True):
        assert [p["class"] for p in x["predictions"]] == [p["class"] for p in y["predictions"]]
        got = [p["probability"] for p in y["predictions"]]
        assert got == pytest.approx([p["probability"] for p in x["predictions"]], abs=1e-6)


def test_predict_on_a_cluster_needs_a_stage2_run(finetuned, new_images):
    """An end-to-end model has no features to compute on workers: one line, exit 2, before any cluster."""
    r = run_cli("predict", "--model", str(finetuned), str(new_images), "--cluster", "local:2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("featcache: error: --cluster: predict runs on a")
    assert "cluster: a local cluster" not in r.stderr  # no cluster was started


def assert_matches_rebuilt_model(run: Path, results) -> None:
    from pipeline.data.images import load_images
    from pipeline.model.rebuild import rebuild

    rb = rebuild(run)
    for res in results:
        # the documented helper: the run's decode policy and resize, S×S pixels the model takes unchanged
        p = rb.model(load_images([res.image], rb.image_size, rb.resize, rb.decode)).numpy()[0]
        got = dict((i, prob) for i, _, prob in res.top)
        assert max(abs(got[i] - p[i]) for i in got) <= TOL


def test_predict_reuses_the_tflite_model_extraction_converted(stage3, new_images, monkeypatch):
    """New images run on the engine extraction uses: a converted backbone in the cache is reused, not redone."""
    from pipeline.features import engines
    from pipeline.heads.persist import load_run
    from pipeline.model.image_features import feature_model
    from pipeline.model.rebuild import run_source
    from pipeline.stages.predict import predict

    src = run_source(load_run(stage3["run"]).metrics)
    engines.load_or_convert(feature_model(src), 0, src.cache_path.parent, verbose=False)
    monkeypatch.setattr(engines, "AUTO_MIN_SPEEDUP", 0.0)  # whatever the probe measured on this machine
    calls: list[int] = []
    run_tflite = engines.TFLiteEngine.__call__
    monkeypatch.setattr(
        engines.TFLiteEngine, "__call__", lambda self, x: calls.append(len(x)) or run_tflite(self, x)
    )
    before = engines.conversions
    _, results = predict(stage3["run"], [str(new_images / "china"), str(new_images / "flower")], top_k=2)
    assert engines.conversions == before and sum(calls) == 4  # the 4 new photos, on the cached model
    assert [r.source for r in results] == ["computed"] * 4
    assert_matches_rebuilt_model(stage3["run"], results)


def test_predict_with_finetuned_and_exported_models(finetuned, exported, new_images):
    from pipeline.stages.predict import predict

    images = [str(new_images / "china"), str(new_images / "flower")]
    outputs = {}
    for fmt, model in {
        "run": finetuned,
        "keras": exported["formats"]["keras"]["path"],
        "savedmodel": exported["formats"]["savedmodel"]["path"],
        "tflite": exported["formats"]["tflite"]["path"],
    }.items():
        predictor, results = predict(model, images, top_k=2)
        assert predictor.class_names == ["china", "flower"]
        assert all(r.error is None and r.source == "model" for r in results)
        outputs[fmt] = np.array([[dict((i, p) for i, _, p in r.top)[k] for k in (0, 1)] for r in results])
    for fmt in ("keras", "savedmodel", "tflite"):
        assert np.abs(outputs[fmt] - outputs["run"]).max() <= 1e-4, fmt

    from pipeline.stages.predict import format_csv

    _, results = predict(exported["formats"]["tflite-int8"]["path"], images[:1], top_k=1)
    lines = format_csv(results).strip().splitlines()
    assert lines[0] == "image,rank,class,index,probability,features,error" and len(lines) == 3


def test_predict_and_export_errors_are_one_line(stage3, tmp_path):
    r = run_cli("predict", "--model", str(stage3["run"]), str(tmp_path / "missing.jpg"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "featcache: error: image not found"
    )
    r = run_cli("predict", "--model", str(tmp_path / "nope"), str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("export", "--run", str(stage3["run"]), "--format", "coreml")
    assert r.returncode == 2 and "unknown format 'coreml'" in r.stderr and "Traceback" not in r.stderr


def test_export_refuses_a_conversion_that_would_not_fit_in_memory(stage3, tmp_path, monkeypatch):
    from pipeline.features import tflite
    from pipeline.stages.export import export
    from pipeline.utils.errors import FeatcacheError

    monkeypatch.setattr(tflite, "CONVERT_MEMORY_FACTOR", 1e9)  # more memory than any machine has
    with pytest.raises(FeatcacheError, match=r"converting the model to TFLite needs about .* GiB of memory"):
        export(stage3["run"], "tflite", tmp_path)
    assert not list(tmp_path.rglob("*.tflite"))


def test_predict_on_every_model_kind_survives_garbage_collection(stage3, finetuned, exported, new_images):
    """Every documented ``--model`` kind predicts, even when the collector runs between load and predict.

    A ``.keras`` model used to be held only through the weak reference of its compiled function, so a
    collection after loading freed it ('NoneType' object is not callable) — fine-tuned runs and
    ``model.keras`` crashed while stage-2 runs, SavedModel and TFLite worked.
    """
    import gc

    from pipeline.data.sources import Dataset, Sample, storable_key
    from pipeline.stages.predict import load_predictor, predict

    cfg = load_config(None, stage3["overrides"])
    f = exported["formats"]
    kinds = {
        "stage-2 run": (stage3["run"], "stage2"),
        "stage-2 run id": (stage3["run"].name, "stage2"),
        "fine-tuned run": (finetuned, "keras"),
        "fine-tuned run id": (finetuned.name, "keras"),
        "model.keras": (f["keras"]["path"], "keras"),
        "SavedModel": (f["savedmodel"]["path"], "savedmodel"),
        "TFLite": (f["tflite"]["path"], "tflite"),
    }
    images = [str(new_images / "china")]
    paths = sorted((new_images / "china").iterdir())
    samples = [Sample(storable_key(str(p)), "", path=str(p)) for p in paths]
    for what, (model, kind) in kinds.items():
        predictor = load_predictor(model, 8, cfg)
        gc.collect()  # the model must outlive this: the predictor owns it
        proba, ok, *_ = predictor.predict(Dataset("t", "<paths>", samples, [""]), samples)
        assert predictor.kind == kind and ok.all(), what
        assert np.allclose(proba.sum(1), 1, atol=1e-5) and (proba.argmax(1) == 0).all(), what
        _, results = predict(model, images, top_k=1, cfg=cfg)
        assert [r.top[0][1] for r in results] == ["china", "china"], what


def test_cli_predicts_with_a_finetuned_run_id(stage3, finetuned, new_images):
    """The headline flow in a real process: ``predict --model <fine-tuned run id>``."""
    r = run_cli(
        "predict",
        "--model",
        finetuned.name,
        "--cache-dir",
        stage3["overrides"]["extract.cache_dir"],
        str(new_images / "flower"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and all(x["predictions"][0]["class"] == "flower" for x in rows)
