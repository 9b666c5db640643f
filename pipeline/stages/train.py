"""Stage 2: fit a head on cached features, evaluate it on val and test, and write a run folder.

This stage finds the cache (:func:`pipeline.cache.locate.resolve_cache`); fitting and writing the run is
:mod:`pipeline.heads.training`, which a search's refit shares.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.locate import resolve_cache
from pipeline.heads.training import TrainRun, check_train_config, fit_run
from pipeline.utils.config import Config


def train(cfg: Config, *, run_dir: Path | None = None) -> TrainRun:
    """Fit ``cfg.train.head`` on the cache, evaluate on val and test, write ``<runs>/<id>/``."""
    check_train_config(cfg.train)  # fail fast on names, before any data is read
    return fit_run(cfg, resolve_cache(cfg), run_dir=run_dir)
