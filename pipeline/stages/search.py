"""Search heads, hyperparameters, transforms and cached layers on the val split (or k-fold CV on train+val).
On a multi-label cache the score is macro mAP and the space keeps the heads that train multi-label.

A space is a TOML file (``pipeline/configs/search_space.toml`` is the built-in one, and documents the format). Trials
run through joblib (``n_jobs``) and each finished trial is appended to ``trials.jsonl`` at once, keyed by a
hash of what defines it (layer, head, params, transforms, cache fingerprint, cv, resource, seed), so a
killed search rerun with the same settings lands in the same folder, skips what is done and finishes the
rest. The test split never reaches a search: its rows are not even loaded. With ``search.refit`` (the
default) the search ends by training its best configuration as a run, as ``featcache train`` does with
``best.toml``; a rerun reuses that run.

This stage finds the cache and the search folder and composes :mod:`pipeline.tuning`, which does the rest.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.tuning import (
    SearchRun,
    Space,
    TrialRunner,
    add_extras,
    build_leaderboard,
    convertible_space,
    halving,
    load_space,
    multilabel_space,
    plan_folds,
    refit_best,
    row_halving,
    row_halving_note,
    score_metric,
    strategy_candidates,
    tie_note,
    write_outputs,
    write_summary,
)
from pipeline.utils.config import Config, SearchConfig, resolve_config
from pipeline.utils.io import file_lock
from pipeline.utils.journal import TRIALS_FILE


def search_id(space: Space, fingerprint: str, cfg: Config) -> str:
    """The search folder's name: what defines the search, so a rerun with the same settings resumes it."""
    s = cfg.search
    ident = {
        "space": space.canonical(),
        "fingerprint": fingerprint,
        "strategy": s.strategy,
        "n_trials": s.n_trials if s.strategy != "grid" else None,
        "cv": s.cv,
        "seed": cfg.train.seed,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def search(
    cfg: Config | str | Path | None = None,
    *,
    fresh: bool = False,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> SearchRun:
    """Run (or resume) the search that ``cfg`` describes, keywords on top
    (:func:`pipeline.utils.config.resolve_config`); write trials, leaderboard and ``best.toml``, and train the
    best configuration as a run (``search.refit``: :attr:`SearchRun.refit_dir`)."""
    from pipeline.cache.locate import resolve_cache, runs_root
    from pipeline.cache.reader import Data, close_cache, use_streaming
    from pipeline.cache.state import cache_state, searched_data
    from pipeline.cache.store import FeatureCache
    from pipeline.utils.plots import preload as preload_plots

    cfg = resolve_config(cfg, "search", **options)
    t0 = time.perf_counter()
    s, seed = cfg.search, cfg.train.seed
    if progress is None and cfg.extract.progress:
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cache_path = resolve_cache(cfg)
    with FeatureCache(cache_path) as cache:
        space = load_space(s.space, cache.layer_name(cfg.train.layer), cache.multilabel)
        if s.convertible:
            space = convertible_space(space)
        notes_space = []
        if cache.multilabel:
            space, notes_space = multilabel_space(space)
        for e in space.entries:
            for layer in e.layers:
                cache.layer_name(layer)  # a layer this cache does not have fails now, not in a worker
        candidates = strategy_candidates(space, s.strategy, s.n_trials, seed)
        plan, rows, notes = plan_folds(cache, s.cv, seed)
        notes = notes_space + notes + _small_val_note(cache, s.cv)
        layers = sorted({c.layer for c in candidates})
        n_bytes = sum(len(rows) * int(cache.dataset(layer).shape[1]) * 4 for layer in layers)
        streamed = use_streaming(cfg.train.streaming, n_bytes, multilabel=cache.multilabel)
        shared = not cfg.cluster.address  # local trial workers attach to the features, a cluster gets copies
        fingerprint, scored_on = cache.fingerprint, cache_state(cache)
        text_id = add_extras(plan, cfg, cache, [c.head for c in candidates])  # a text head's class embeddings
        data_id = searched_data(fingerprint, scored_on)  # trials are reused only on the same rows
        data_id += f":{text_id}" if text_id else ""  # ... and the same prompts
        out = runs_root(cfg, cache_path) / f"search-{search_id(space, data_id, cfg)}"
        out.mkdir(parents=True, exist_ok=True)
        busy = f"{out}: another featcache search is running this search; wait for it or use another space"
        data = {}
        try:
            with file_lock(out / "search.lock", busy):
                for layer in layers:
                    data[layer] = Data.from_cache(cache, layer, rows, streamed, shared)
                if fresh:
                    for name in (TRIALS_FILE, "leaderboard.csv", "best.toml", "search.json"):
                        (out / name).unlink(missing_ok=True)
                preload_plots()  # while the trials run
                with _cluster(cfg) as client:
                    runner = TrialRunner(
                        out / TRIALS_FILE, data, plan, data_id, s.cv, seed, s.n_jobs, progress, client
                    )
                    run = _run(runner, candidates, s, plan, notes, t0)
                write_outputs(run, space, cache_path, seed)
                try:
                    if s.refit and run.best is not None:
                        if progress:
                            progress("refit: the best configuration, as a run")
                        run.refit = refit_best(cfg, run.best, out, cache_path)
                finally:
                    search_config = cfg.to_dict()["search"]
                    write_summary(run, space, cache_path, fingerprint, search_config, streamed, scored_on)
        finally:
            for d in data.values():
                d.release()
            close_cache(cache_path)
    return run


def _run(runner: TrialRunner, candidates, s: SearchConfig, plan, notes: list[str], t0: float) -> SearchRun:
    """Every candidate's trials (halving's rungs, or each once at full size), ranked."""
    n_fit = len(plan.folds[0][0])
    try:
        if s.strategy == "halving":
            results = halving(runner, candidates, n_fit, plan.n_classes, notes)
        elif row_halving(s.strategy, n_fit, s.halving_rows, len(candidates)):
            notes = notes + [row_halving_note(n_fit, s.halving_rows, len(candidates), plan.n_classes)]
            results = halving(runner, candidates, n_fit, plan.n_classes, notes, s.halving_rows)
        else:
            got = runner.run(candidates, 1.0)
            results = {c: (1.0, got[c]) for c in candidates}
    finally:
        runner.close()
    board = build_leaderboard(results, plan.resolution)
    best = next((r for r in board if r["status"] == "ok"), None)
    seconds = time.perf_counter() - t0
    n_run, n_reused = runner.n_run, runner.n_reused
    tie = tie_note(board, plan.n_eval, plan.resolution, score_metric(s.cv, plan.multilabel))
    notes = notes + ([tie] if tie else [])
    return SearchRun(
        runner.journal.parent,
        s.strategy,
        board,
        best,
        len(candidates),
        n_run,
        n_reused,
        seconds,
        s.cv,
        notes,
        multilabel=plan.multilabel,
    )


def _small_val_note(cache, cv: int) -> list[str]:
    """``train``'s note on classes too small for the val split (the test split plays no part in a search)."""
    import numpy as np

    from pipeline.data.splits import small_class_note

    if cv or cache.multilabel:
        return []
    val_only = np.where(np.asarray(cache.split) == 1, 1, 0)
    note = small_class_note(cache.labels, val_only, cache.class_names)
    return [note] if note else []


def _cluster(cfg: Config):
    """A Dask client on ``[cluster] address`` (None for this machine): trials then run on its workers,
    the features scattered to each once. Trials are seeded, so either way gives the same scores; the
    journal stays on this machine, so a cluster search resumes like a local one."""
    from pipeline.utils.cluster import cluster_client

    return cluster_client(cfg.cluster.address, quiet=not cfg.extract.progress)
