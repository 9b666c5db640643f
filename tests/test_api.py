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
