"""The public Python API stays callable however the stage modules were imported."""

from __future__ import annotations

import importlib

import pytest

import pipeline
from pipeline.utils.errors import FeatcacheError

STAGES = {
    "extract": "stages.extract",
    "train": "stages.train",
    "search": "stages.search",
    "predict": "stages.predict",
    "export": "stages.export",
    "finetune": "stages.finetune",
    "rebuild": "model.rebuild",
    "audit": "stages.audit",
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_names_stay_callable_after_their_module_is_imported(name):
    importlib.import_module(f"pipeline.{STAGES[name]}")  # stage modules live in subpackages: no shadowing
    assert callable(getattr(pipeline, name))
    assert getattr(pipeline, name) is getattr(importlib.import_module(f"pipeline.{STAGES[name]}"), name)


def test_the_public_function_is_called():
    importlib.import_module("pipeline.stages.extract")
    with pytest.raises(FeatcacheError, match="data.sauce"):
        pipeline.extract(None, data__sauce="x")


#: every stage, with what comes before its config (predict: the model and images)
CALL_FORMS = {
    "extract": (),
    "train": (),
    "search": (),
    "audit": (),
    "finetune": (),
    "report": (),
    "export": (),
    "predict": ("no/such/model.keras", ["x.jpg"]),
}


@pytest.mark.parametrize("name", sorted(CALL_FORMS))
def test_every_stage_takes_a_config_a_toml_path_or_keywords(name, tmp_path):
    """One call shape: keywords are checked before any work, the same way for every stage."""
    stage, before = getattr(pipeline, name), CALL_FORMS[name]
    with pytest.raises(FeatcacheError, match="unknown keyword 'bogus_option'"):
        stage(*before, bogus_option=1)
    with pytest.raises(FeatcacheError, match="data.sauce"):
        stage(*before, data__sauce="x")
    toml = tmp_path / "my.toml"
    toml.write_text("[predict]\ntop_k = 0\n")
    with pytest.raises(FeatcacheError, match="predict.top_k must be >= 1"):
        stage(*before, str(toml))
    cfg = pipeline.load_config(None, {"extract.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(FeatcacheError, match="image_size"):  # keywords override a Config's values
        stage(*before, cfg, image_size=5)
    assert cfg.backbone.image_size == 0  # ...on a copy


def test_plain_keywords_are_the_flags_and_the_key_names():
    from pipeline.utils.config import resolve_config

    cfg = resolve_config(None, "train", data="photos/", layer="fc1", image_size=96, head="knn", cache_dir="c")
    assert (cfg.data.source, cfg.backbone.layers, cfg.train.layer) == ("photos/", ["fc1"], "fc1")
    assert (cfg.backbone.image_size, cfg.train.head, cfg.extract.cache_dir) == (96, "knn", "c")
    assert {"data.source", "backbone.layers", "train.head"} <= cfg.given
    assert resolve_config(None, "extract", batch_size=8).extract.batch_size == 8  # the stage's own key
    assert resolve_config(None, "predict", batch_size=8).predict.batch_size == 8
    assert resolve_config(None, "predict", cluster="local:2", top_k=None).cluster.address == "local:2"
    with pytest.raises(FeatcacheError, match="could be extract.batch_size, finetune.batch_size"):
        resolve_config(None, "train", batch_size=8)
    with pytest.raises(FeatcacheError, match=r"unknown keyword 'top_kk' \(did you mean top_k\?\)"):
        resolve_config(None, "predict", top_kk=3)


def test_train_takes_plain_keywords_instead_of_a_type_error(tmp_path):
    with pytest.raises(FeatcacheError, match="not found"):
        pipeline.train(data=str(tmp_path / "photos"), cache_dir=str(tmp_path / "cache"))


def test_a_cache_hands_out_x_and_y_of_a_split_in_one_call(digits_cache):
    import numpy as np

    with pipeline.open_cache(digits_cache) as cache:
        for split in ("train", "val", "test"):
            X, y = cache.xy(split)
            rows = cache.rows(split)
            assert X.dtype == np.float32 and X.shape == (len(rows), cache.dataset().shape[1])
            assert np.array_equal(X, cache.features(rows=rows)) and np.array_equal(y, cache.labels[rows])
        X, y = cache.xy(layer=cache.layers[0])
        assert len(X) == len(y) == cache.n_rows
        with pytest.raises(FeatcacheError, match="unknown split 'tset'"):
            cache.xy("tset")


def test_a_run_opens_from_a_stage_result_its_folder_its_id_or_a_prefix(digits_cache, tmp_path):
    import numpy as np

    from pipeline.utils.config import load_config
    from pipeline.utils.runs import RunMetrics

    runs = tmp_path / "runs"
    cfg = load_config(None, {"train.cache": str(digits_cache), "train.runs_dir": str(runs)})
    trained = pipeline.train(cfg)
    run = pipeline.Run(trained)
    assert run.path == trained.run_dir and run.id == trained.run_dir.name and run.kind == "train"
    assert isinstance(run.metrics, RunMetrics) and run.metrics == trained.metrics
    assert run.class_names == [str(i) for i in range(10)]
    for name in (trained.run_dir, str(trained.run_dir), run.id, run.id[:-2]):
        assert pipeline.Run(name, cfg).path == run.path
    assert pipeline.Run(train__cache=str(digits_cache), train__runs_dir=str(runs)).path == run.path  # newest
    with pipeline.open_cache(digits_cache) as cache:
        X, y = cache.xy("test")
    assert float(np.mean(run.model.predict(X) == y)) == pytest.approx(run.metrics.test_accuracy)
    assert repr(run).startswith(f"Run({run.id!r}, kind='train', head='logistic', val_accuracy=0.")

    unfinished = runs / "20260101-000000-logistic-0000"
    unfinished.mkdir()
    (unfinished / "metrics.json").write_text("{}")
    with pytest.raises(FeatcacheError, match="no manifest.json; the run did not finish"):
        pipeline.Run(unfinished)
    with pytest.raises(TypeError, match="not int"):
        pipeline.Run(3)
