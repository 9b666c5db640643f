"""Stage 2: fit a head on cached features, evaluate it on val and test, and write a run folder.

This stage finds the cache (:func:`pipeline.cache.locate.resolve_cache`); fitting and writing the run is
:mod:`pipeline.heads.training`, which a search's refit shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.cache.locate import resolve_cache
from pipeline.heads.training import TrainRun, check_train_config, fit_run
from pipeline.utils.config import Config, resolve_config


def train(cfg: Config | str | Path | None = None, *, run_dir: Path | None = None, **options: Any) -> TrainRun:
    """Fit ``train.head`` on the cache, evaluate on val and test, write ``<runs>/<id>/``. ``cfg`` is a
    :class:`Config`, a TOML path or None; keywords (``data=``, ``head=``, ``train__params=``, ...) override
    it (:func:`pipeline.utils.config.resolve_config`)."""
    cfg = resolve_config(cfg, "train", **options)
    check_train_config(cfg.train)  # fail fast on names, before any data is read
    return fit_run(cfg, resolve_cache(cfg), run_dir=run_dir)
