"""The public Python API stays callable however the stage modules were imported."""

from __future__ import annotations

import importlib

import pytest

import pipeline
from pipeline.errors import FeatcacheError


@pytest.mark.parametrize("name", ["extract", "train", "search", "predict", "export", "finetune", "rebuild"])
def test_stage_names_stay_callable_after_their_module_is_imported(name):
    importlib.import_module(f"pipeline.{name}")  # now pipeline.<name> is the module attribute
    assert callable(getattr(pipeline, name))


def test_calling_the_module_calls_the_function():
    importlib.import_module("pipeline.extract")
    with pytest.raises(FeatcacheError, match="data.sauce"):
        pipeline.extract(None, data__sauce="x")
