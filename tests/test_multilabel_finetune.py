"""Multi-label runs end to end: the rebuilt model (sigmoid outputs) equals the stage-2 one-vs-rest head,
fine-tuning with binary cross-entropy writes a multi-label run with thresholds chosen again on val, every
export format matches Keras, and predict from an export gives the labels predict on the run gives.

Real data: 2×2 Fashion-MNIST mosaics (tests/mosaics.py), 32 px, the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import json

import pytest

from tests.mosaics import CLASSES, HAVE_FASHION, write_mosaics
from tests.mosaics import mosaic_config as _cfg

pytestmark = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset) not installed")

TOL = 1e-4  # the bar single-label runs meet: max |Δ probability| rebuilt model vs the stage-2 head


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    """~200 mosaics → a multi-label cache → a logistic and a ridge run."""
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    tmp = tmp_path_factory.mktemp("mlft")
    truth = write_mosaics(tmp / "data", 200, seed=1)
    extract(_cfg(tmp))
    logistic = train(_cfg(tmp), head="logistic", train__params={"C": 0.1}).run_dir
    ridge = train(_cfg(tmp), head="ridge").run_dir
    return {"tmp": tmp, "truth": truth, "logistic": logistic, "ridge": ridge}


@pytest.fixture(scope="module")
def finetuned(ml):
    from pipeline.stages.finetune import finetune

    cfg = _cfg(ml["tmp"], **{"finetune.epochs": 1, "finetune.batch_size": 16, "finetune.unfreeze": "top:1"})
    return finetune(cfg, run=str(ml["logistic"]))


@pytest.mark.parametrize("head", ["logistic", "ridge"])
def test_rebuilt_model_equals_the_stage2_scores(ml, head):
    from pipeline.model.rebuild import equivalence, rebuild

    rb = rebuild(ml[head])
    assert rb.multilabel and rb.head_check is not None and rb.head_check <= 1e-5
    assert rb.head.layers[-1].get_config()["activation"] == "sigmoid"
    eq = equivalence(rb)
    assert eq["n"] > 10 and eq["max_abs_diff"] <= TOL, eq
    # each class's threshold is one val image's score, so that image's label may flip by float rounding
    assert eq["same_predictions"] >= eq["n"] - len(CLASSES), eq


def test_finetune_writes_a_multilabel_run(ml, finetuned):
    from pipeline.utils.run_text import format_run
    from pipeline.utils.runs import describe_run, read_metrics

    m = read_metrics(finetuned.run_dir)
    assert m.multilabel and set(m["thresholds"]) == set(CLASSES.values())
    assert all(0.0 <= t <= 1.0 for t in m["thresholds"].values())
    assert m["equivalence"]["max_abs_diff"] <= TOL
    assert m["fit"]["epochs"] == 1 and "loss" in m["history"]
    for split in ("val", "test"):
        assert 0.0 < m[split]["macro_map"] <= 1.0 and "per_class" in m[split]
    assert m["test"]["macro_map"] > m["test"]["map_baseline"], m["test"]
    assert m["head_alone"]["val"] == read_metrics(ml["logistic"])["val"]["macro_map"]
    assert "mAP" in finetuned.summary()
    assert "macro_mAP" in format_run(describe_run(finetuned.run_dir))


@pytest.fixture(scope="module")
def exported(ml):
    from pipeline.stages.export import export

    out = ml["tmp"] / "export"
    return out, export(str(ml["logistic"]), "all", out, cfg=_cfg(ml["tmp"], **{"export.calibration": 32}))


def test_export_all_formats_of_a_multilabel_run(ml, exported):
    from pipeline.model.sidecars import export_info
    from pipeline.stages.export import FORMATS, format_report
    from pipeline.utils.runs import read_metrics

    out, r = exported
    thresholds = read_metrics(ml["logistic"])["thresholds"]
    assert r["ok"] and set(r["formats"]) == set(FORMATS), format_report(r)
    assert r["task"] == "multilabel" and r["thresholds"] == thresholds
    assert "keras_accuracy" not in r and 0 < r["keras_macro_map"] <= 1
    for fmt in ("tflite", "tflite-dynamic", "tflite-int8"):  # MediaPipe metadata says what the scores are
        assert r["formats"][fmt]["metadata"]["scores"].startswith("Independent sigmoid probability of each")
    assert r["formats"]["embedder"]["min_cosine_cache"] >= 0.999
    for fmt in ("keras", "savedmodel", "tflite", "onnx"):
        e = r["formats"][fmt]
        assert e["max_abs_diff"] <= r["tolerances"][fmt]["max_abs_diff"], (fmt, e)
        assert e["same_labels"] >= 0.9 and abs(e["macro_map_delta"]) < 1e-3, (fmt, e)
    for fmt in ("tflite-dynamic", "tflite-int8"):
        assert r["formats"][fmt]["macro_map_delta"] >= -r["tolerances"][fmt]["map_drop"] - 1e-9
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["thresholds"] == thresholds
    info = export_info(out / "model.tflite")
    assert info.thresholds == [thresholds[c] for c in info.class_names]
    assert "macro mAP" in format_report(r)


def _labels(results):
    return [[c for _, c, _ in r.labels] for r in results]


def test_predict_from_the_export_gives_the_run_labels(ml, exported):
    from pipeline.stages.predict import format_json, predict

    out, r = exported
    cfg = _cfg(ml["tmp"])
    images = [str(ml["tmp"] / "data" / f"m{i:04d}.png") for i in range(24)]
    _, want = predict(str(ml["logistic"]), images, cfg, top_k=2)
    thresholds = r["thresholds"]
    for model in ("model.keras", "saved_model", "model.tflite", "model.onnx"):
        p, got = predict(str(out / model), images, cfg, top_k=2)
        assert p.thresholds is not None, model
        for g, w in zip(got, want, strict=True):
            near = {
                c for _, c, prob in w.top if abs(prob - thresholds[c]) < 1e-4
            }  # at a threshold: either way
            assert {c for _, c, _ in g.labels} - near == {c for _, c, _ in w.labels} - near, (model, g, w)
            assert [c for _, c, _ in g.top] == [c for _, c, _ in w.top] or near, (model, g, w)
        rows = json.loads(format_json(got))
        assert set(rows[0]) == {"image", "predictions", "features", "error", "labels", "novelty", "novel"}
        assert set(rows[0]["predictions"][0]) == {"class", "index", "probability"}


def test_finetuned_run_exports_and_predicts(ml, finetuned):
    from pipeline.stages.export import export
    from pipeline.stages.predict import predict

    out = ml["tmp"] / "export-ft"
    r = export(str(finetuned.run_dir), "tflite", out, cfg=_cfg(ml["tmp"]))
    assert r["ok"] and r["run_kind"] == "finetune" and r["thresholds"] == finetuned.metrics["thresholds"]
    images = [str(ml["tmp"] / "data" / f"m{i:04d}.png") for i in range(8)]
    p_run, from_run = predict(str(finetuned.run_dir), images, _cfg(ml["tmp"]))
    p_lite, from_lite = predict(str(out / "model.tflite"), images, _cfg(ml["tmp"]))
    assert (
        p_run.thresholds
        == p_lite.thresholds
        == [finetuned.metrics["thresholds"][c] for c in p_run.class_names]
    )
    agree = sum(_labels([a]) == _labels([b]) for a, b in zip(from_run, from_lite, strict=True))
    assert agree >= len(images) - 1


def test_export_json_thresholds_are_checked_and_single_label_ones_still_read(tmp_path):
    from pipeline.model.sidecars import export_info
    from pipeline.utils.errors import FeatcacheError

    old = {"run": "/x", "class_names": ["a", "b"], "image_size": 32, "resize": "stretch", "decode": "exact"}
    (tmp_path / "export.json").write_text(json.dumps(old))
    info = export_info(tmp_path / "export.json")
    assert info.class_names == ["a", "b"] and info.thresholds is None
    good = {**old, "task": "multilabel", "thresholds": {"a": 0.3, "b": 0.7}}
    (tmp_path / "export.json").write_text(json.dumps(good))
    assert export_info(tmp_path / "export.json").thresholds == [0.3, 0.7]
    for bad in (
        {**good, "thresholds": {"a": 0.3}},
        {**good, "thresholds": {"a": 0.3, "b": 1.5}},
        {**good, "thresholds": {"a": "x", "b": 0.5}},
        {**good, "task": "single"},
        {**old, "thresholds": {"a": 0.3, "b": 0.7}},
    ):
        (tmp_path / "export.json").write_text(json.dumps(bad))
        with pytest.raises(FeatcacheError, match="not a sidecar featcache wrote"):
            export_info(tmp_path / "export.json")


def test_a_tflite_model_whose_sidecar_has_other_classes_is_refused(ml, exported, tmp_path):
    import shutil

    from pipeline.stages.predict import predict
    from pipeline.utils.errors import FeatcacheError

    out, _ = exported
    shutil.copy(out / "model.tflite", tmp_path / "model.tflite")
    info = json.loads((out / "export.json").read_text())
    kept = info["class_names"][:3]  # the model has four outputs
    info |= {"class_names": kept, "thresholds": {c: info["thresholds"][c] for c in kept}}
    (tmp_path / "export.json").write_text(json.dumps(info))
    image = str(ml["tmp"] / "data" / "m0000.png")
    with pytest.raises(FeatcacheError, match="3 class thresholds, the model has 4 outputs") as e:
        predict(str(tmp_path / "model.tflite"), [image], _cfg(ml["tmp"]))
    assert "\n" not in str(e.value)


def test_report_of_a_finetuned_multilabel_run_says_why_it_has_no_curves(ml, finetuned, tmp_path):
    """A fine-tuned run's model reads images, so the report (which never runs the backbone) draws no
    precision-recall curves for it and says why; its scores and per-class table are still shown, and the
    stage-2 run it came from still gets its curves."""
    from pipeline.stages.report import report
    from pipeline.stages.report.multilabel import FINETUNE_NO_CURVES
    from tests.test_multilabel_audit_report import Tables

    out = tmp_path / "ft.html"
    run_dir = finetuned.run_dir
    rep = report(_cfg(ml["tmp"]), out=out, run=run_dir.name, thumbnails=0, map_rows=50, tsne_rows=0)
    text = out.read_text(encoding="utf-8")
    page = Tables(text)
    assert rep.detailed[0] == run_dir.name
    assert any(h.startswith(f"Fine-tuned run {run_dir.name} (") for h in page.headings)
    start = text.index(f"Fine-tuned run {run_dir.name}")
    ft_section = text[start : text.find("<h2>", start)]
    assert "fine-tuned end to end, a sigmoid per class" in ft_section and "one-vs-rest" not in ft_section
    assert FINETUNE_NO_CURVES in ft_section.replace("&#x27;", "'") and "per-class" in page.tables
    assert "test scores unavailable" not in text
    if rep.best != run_dir.name:  # the stage-2 run, best on val, is scored from its own model
        assert "precision-recall curves" in page.imgs
