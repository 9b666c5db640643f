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
