"""A search's refit: its best trial trained as a run, as ``featcache train --config best.toml`` trains it.

scikit-learn's searches refit the best candidate by default, so what a search returns can predict. Here the
best configuration is fitted on the train split (val drives early stopping) and scored on val and test by
:func:`pipeline.heads.training.fit_run`, the code ``featcache train`` runs: the same files, metrics and
manifest, so ``predict``, ``finetune`` and ``export`` take it like any run. ``search.json`` names it, and
its ``metrics.json`` names the search, the trial and a key of what it was trained from: a rerun of a
finished (or killed) search finds a finished run with that key beside the search and reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.heads.training import fit_run
from pipeline.utils.config import Config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.runs import RunMetrics, finished_runs, read_metrics, verify_run


@dataclass
class Refit:
    """The run a search trained from its best trial; ``reused`` when an earlier call of the search had."""

    run_dir: Path
    metrics: RunMetrics
    key: str  # what the run was trained from: the best trial and the [train] settings
    trial: str  # the best trial's journal key
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run_dir.name, "path": str(self.run_dir), "key": self.key, "trial": self.trial}


def best_train(best: dict[str, Any], cache_path: Path, seed: int) -> dict[str, Any]:
    """The best trial as ``[train]`` settings (``"none"`` for None: TOML has no null), as ``best.toml``
    writes them and the refit trains them."""
    cand = best["_cand"]
    return {
        "cache": str(Path(cache_path).resolve()),
        "layer": cand.layer,
        "head": cand.head,
        "transforms": list(cand.transforms),
        "seed": seed,
        "params": {k: ("none" if v is None else v) for k, v in cand.params.items()},
    }


def refit_config(cfg: Config, best: dict[str, Any], cache_path: Path) -> Config:
    """``cfg`` with its ``[train]`` section set to the best trial (runs folder and streaming kept)."""
    train = dataclasses.replace(cfg.train, **best_train(best, cache_path, cfg.train.seed))
    return dataclasses.replace(cfg, train=train)


def refit_best(cfg: Config, best: dict[str, Any], search_dir: Path, cache_path: Path) -> Refit:
    """Train ``best`` as a run beside the search folder, or reuse the run an earlier call trained from it."""
    refit_cfg = refit_config(cfg, best, cache_path)
    ident = {"trial": best["key"], "train": refit_cfg.to_dict()["train"]}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    previous = _finished_refit(search_dir.parent, cache_path, key)
    if previous is not None:
        return Refit(previous, read_metrics(previous), key, best["key"], reused=True)
    origin = {"search": {"folder": search_dir.name, "trial": best["key"], "score": best["score"], "key": key}}
    done = fit_run(refit_cfg, cache_path, extra=origin)
    return Refit(done.run_dir, RunMetrics(done.metrics), key, best["key"])


def _finished_refit(runs: Path, cache_path: Path, key: str) -> Path | None:
    """A finished, intact run of this cache in ``runs`` that a refit trained from ``key``, if any."""
    for path in finished_runs(runs, cache_path, finetuned=False):
        if (read_metrics(path, missing_ok=True).get("search") or {}).get("key") != key:
            continue
        try:
            verify_run(path)
        except FeatcacheError:
            continue  # changed since: train it again
        return path
    return None
