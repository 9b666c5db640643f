"""featcache: run a frozen pretrained backbone once, cache its features, train and search heads on them.

The public API is imported lazily, so ``import pipeline`` (and ``featcache --help``) stays instant::

    import pipeline
    result = pipeline.extract(data="photos/")                # stage 1: the feature cache
    run = pipeline.train(data="photos/", head="linear_svm")  # every stage: a Config, a TOML path or none,
    cache = pipeline.open_cache(result.path)                 # plus keywords; plain h5py underneath
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.utils.quiet import quiet_api
from pipeline.utils.version import VERSION as __version__  # noqa: F401 - the package version

quiet_api()  # before anything imports TensorFlow: the API is as quiet as the CLI

_LAZY = {
    "Config": "utils.config",
    "load_config": "utils.config",
    "resolve_config": "utils.config",
    "FeatcacheError": "utils.errors",
    "extract": "stages.extract",
    "ExtractResult": "stages.extract",
    "FeatureCache": "cache.store",
    "open_cache": "cache.store",
    "list_caches": "cache.store",
    "load_dataset": "data.sources",
    "load_images": "data.images",
    "FeatureExtractor": "transformer",
    "build_feature_model": "features.backbones.build",
    "train": "stages.train",
    "TrainRun": "heads.training",
    "search": "stages.search",
    "SearchRun": "stages.search",
    "load_run": "heads.persist",
    "load_model": "heads.persist",
    "rebuild": "model.rebuild",
    "finetune": "stages.finetune",
    "predict": "stages.predict",
    "export": "stages.export",
    "audit": "stages.audit",
    "AuditResult": "stages.audit",
    "find": "stages.find",
    "FindResult": "stages.find",
    "report": "stages.report",
    "Report": "stages.report",
    "list_runs": "utils.runs",
    "Run": "api",
    "compare": "api",
    "text_embeddings": "api",
    "CompareResult": "stages.compare",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = sorted(_LAZY)
