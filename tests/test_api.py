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
