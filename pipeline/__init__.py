"""featcache: run a frozen pretrained backbone once, cache its features, train and search heads on them.

The public API is imported lazily, so ``import pipeline`` (and ``featcache --help``) stays instant::

    import pipeline
    result = pipeline.extract(data__source="photos/")      # stage 1: the feature cache
    cache = pipeline.open_cache(result.path)                 # plain h5py underneath
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Config": "config",
    "load_config": "config",
    "FeatcacheError": "errors",
    "extract": "extract",
    "ExtractResult": "extract",
    "FeatureCache": "store",
    "open_cache": "store",
    "list_caches": "store",
    "load_dataset": "sources",
    "FeatureExtractor": "transformer",
    "build_feature_model": "backbones.build",
    "train": "train",
    "TrainRun": "train",
    "search": "search",
    "SearchRun": "search",
    "load_run": "runs",
    "load_model": "runs",
    "rebuild": "rebuild",
    "finetune": "finetune",
    "predict": "predict",
    "export": "export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = sorted(_LAZY)
