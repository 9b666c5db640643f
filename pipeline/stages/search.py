"""Search heads, hyperparameters, transforms and cached layers on the val split (or k-fold CV on train+val).

A space is a TOML file (``pipeline/configs/search_space.toml`` is the built-in one, and documents the format). Trials
run through joblib (``n_jobs``) and each finished trial is appended to ``trials.jsonl`` at once, keyed by a
hash of what defines it (layer, head, params, transforms, cache fingerprint, cv, resource, seed), so a
killed search rerun with the same settings lands in the same folder, skips what is done and finishes the
rest. The test split never reaches a search: its rows are not even loaded.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.heads.metrics import balanced_accuracy, macro_f1
from pipeline.utils.config import Config, read_toml
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, atomic_write, file_lock, write_json
from pipeline.utils.runs import TRIALS_FILE, read_trials

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass


HALVING_FACTOR = 3

# A trial's time budget: TRIAL_BUDGET_FACTOR × the median finished trial, never under BUDGET_FLOOR_S; until
# BUDGET_MIN_TRIALS have finished, BUDGET_EARLY_S. Keras heads (TensorFlow's import, epochs) get KERAS_BUDGET_SCALE ×.
TRIAL_BUDGET_FACTOR = 20
BUDGET_FLOOR_S = 10.0
BUDGET_MIN_TRIALS = 5
BUDGET_EARLY_S = 120.0
KERAS_BUDGET_SCALE = 4
# k-fold CV: a trial whose mean over its first folds is this far below the leader stops there ("pruned")
PRUNE_MARGIN = 0.10
PREPARED_KEPT = 4  # transformed (layer, chain, fold) matrices a worker keeps for the next trials


DISTRIBUTIONS = ("loguniform", "uniform", "randint")


@dataclass(frozen=True)
class Dist:
    """A continuous or integer range for random and halving search: ``{ loguniform = [1e-3, 10] }``."""

    kind: str
    low: float
    high: float

    def sample(self, rng: np.random.Generator):
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        return int(rng.integers(int(self.low), int(self.high) + 1))


@dataclass
class Entry:
    """One ``[[heads]]`` table: a head, its parameter choices, and the transform chains and layers to try."""

    head: str
    params: dict[str, list[Any] | Dist]
    transforms: list[list[str]]
    layers: list[str]

    @property
    def finite(self) -> bool:
        return not any(isinstance(v, Dist) for v in self.params.values())

    def grid(self) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
        names = list(self.params)
        out = []
        for layer, chain in itertools.product(self.layers, self.transforms):
            for values in itertools.product(*(self.params[n] for n in names)):
                out.append((layer, tuple(chain), dict(zip(names, values, strict=True))))
        return out


@dataclass(frozen=True)
class Candidate:
    head: str
    params_json: str  # canonical JSON: hashable, and the same string for the same params
    transforms: tuple[str, ...]
    layer: str

    @classmethod
    def make(cls, head: str, params: dict[str, Any], transforms, layer: str) -> Candidate:
        return cls(head, json.dumps(params, sort_keys=True), tuple(transforms), layer)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    def key(self, fingerprint: str, cv: int, resource: float, seed: int) -> str:
        ident = {
            "layer": self.layer,
            "head": self.head,
            "params": self.params,
            "transforms": list(self.transforms),
            "fingerprint": fingerprint,
            "cv": cv,
            "resource": round(resource, 6),
            "seed": seed,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.head} {params} [{'+'.join(self.transforms) or 'none'}]".replace("  ", " ")


@dataclass
class Space:
    entries: list[Entry]
    source: str

    def canonical(self) -> str:
        def enc(v):
            return {"dist": [v.kind, v.low, v.high]} if isinstance(v, Dist) else v

        return json.dumps(
            [
                [e.head, {k: enc(v) for k, v in e.params.items()}, e.transforms, e.layers]
                for e in self.entries
            ],
            sort_keys=True,
        )

    @property
    def finite(self) -> bool:
        return all(e.finite for e in self.entries)

    def size(self) -> int | None:
        return sum(len(e.grid()) for e in self.entries) if self.finite else None


def default_space_path() -> Path:
    """The built-in space, shipped inside the package (``pipeline/configs/search_space.toml``)."""
    p = Path(__file__).resolve().parents[1] / "configs" / "search_space.toml"
    if not p.is_file():
        raise FeatcacheError(f"built-in search space {p} not found (a broken install?); pass --space FILE")
    return p


def _choices(head: str, name: str, value: Any) -> list[Any] | Dist:
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise FeatcacheError(
                f"space: {head}.{name}: a table must be one of {{{', '.join(DISTRIBUTIONS)} = [low, high]}}"
            )
        kind, bounds = next(iter(value.items()))
        if not (
            isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
        ):
            raise FeatcacheError(f"space: {head}.{name}: {kind} needs [low, high]")
        low, high = float(bounds[0]), float(bounds[1])
        if not low < high or (kind == "loguniform" and low <= 0):
            raise FeatcacheError(f"space: {head}.{name}: bad {kind} range [{bounds[0]}, {bounds[1]}]")
        return Dist(kind, low, high)
    if isinstance(value, list):
        if not value:
            raise FeatcacheError(f"space: {head}.{name}: empty list of choices")
        return list(value)
    return [value]


def parse_space(raw: dict[str, Any], source: str, default_layer: str) -> Space:
    """Validate a space (heads, parameter names, transforms) before any trial runs."""
    from pipeline.heads.registry import make_head
    from pipeline.heads.transforms import parse_transforms

    known_top = {"layers", "transforms", "heads"}
    unknown = set(raw) - known_top
    if unknown:
        raise FeatcacheError(
            f"space {source}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known_top))})"
        )
    layers = raw.get("layers") or [default_layer]
    transforms = raw.get("transforms", [["standardize"]])
    heads = raw.get("heads")
    if not isinstance(heads, list) or not heads:
        raise FeatcacheError(f"space {source}: needs at least one [[heads]] table")
    entries = []
    for i, h in enumerate(heads):
        if not isinstance(h, dict) or "name" not in h:
            raise FeatcacheError(f"space {source}: [[heads]] #{i + 1} needs a name")
        extra = set(h) - {"name", "params", "transforms", "layers"}
        if extra:
            raise FeatcacheError(
                f"space {source}: [[heads]] {h['name']}: unknown key(s) {', '.join(sorted(extra))}"
            )
        chains = h.get("transforms", transforms)
        if not isinstance(chains, list) or not all(isinstance(c, list) for c in chains):
            raise FeatcacheError(
                f'space {source}: {h["name"]}.transforms must be a list of chains, e.g. [["standardize"]]'
            )
        for chain in chains:
            parse_transforms(chain)
        params = {k: _choices(h["name"], k, v) for k, v in (h.get("params") or {}).items()}
        first = {k: (v.low if isinstance(v, Dist) else v[0]) for k, v in params.items()}
        make_head(h["name"], {k: v for k, v in first.items() if k != "class_weight"})  # names checked here
        entries.append(Entry(h["name"], params, [list(c) for c in chains], list(h.get("layers") or layers)))
    return Space(entries, source)


def load_space(path: str | Path | None, default_layer: str) -> Space:
    p = Path(path) if path else default_space_path()
    return parse_space(read_toml(p, "search space"), str(p), default_layer)


def convertible_space(space: Space) -> Space:
    """``space`` without the heads finetune/export cannot convert (``search --convertible``)."""
    from pipeline.heads.registry import NOT_CONVERTIBLE, convertible_head

    kept = [e for e in space.entries if convertible_head(e.head)]
    if not kept:
        raise FeatcacheError(
            f"{space.source}: --convertible leaves no head to search ({', '.join(sorted(NOT_CONVERTIBLE))}"
            " cannot be converted); add a linear, MLP or Keras head to the space"
        )
    return Space(kept, space.source)


def grid_candidates(space: Space) -> list[Candidate]:
    for e in space.entries:
        for name, v in e.params.items():
            if isinstance(v, Dist):
                raise FeatcacheError(
                    f"space: {e.head}.{name} is a {v.kind} range; grid search needs a list (use --strategy random)"
                )
    seen: dict[Candidate, None] = {}
    for e in space.entries:
        for layer, chain, params in e.grid():
            seen.setdefault(Candidate.make(e.head, params, chain, layer))
    return list(seen)


def random_candidates(space: Space, n: int, seed: int) -> list[Candidate]:
    """``n`` distinct draws: without replacement from a finite space, else sampled from the ranges."""
    rng = np.random.default_rng(seed)
    if space.finite:
        grid = grid_candidates(space)
        if len(grid) <= n:
            return grid
        return [grid[i] for i in sorted(rng.choice(len(grid), size=n, replace=False))]
    out: dict[Candidate, None] = {}
    for _ in range(50 * n):
        if len(out) >= n:
            break
        e = space.entries[int(rng.integers(len(space.entries)))]
        params = {
            k: (v.sample(rng) if isinstance(v, Dist) else v[int(rng.integers(len(v)))])
            for k, v in e.params.items()
        }
        chain = e.transforms[int(rng.integers(len(e.transforms)))]
        layer = e.layers[int(rng.integers(len(e.layers)))]
        out.setdefault(Candidate.make(e.head, params, chain, layer))
    return list(out)


@dataclass
class Plan:
    """How every trial is scored: (fit rows, scoring rows, early-stopping rows) per fold; test rows absent."""

    folds: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    rank: np.ndarray  # a fixed random rank per cache row: halving's subsets are nested prefixes
    n_classes: int


def _subset(rows: np.ndarray, rank: np.ndarray, fraction: float) -> np.ndarray:
    if fraction >= 1.0:
        return rows
    keep = max(1, int(math.ceil(len(rows) * fraction)))
    return np.sort(rows[np.argsort(rank[rows], kind="stable")[:keep]])


def _failed(e: Exception, t0: float) -> dict[str, Any]:
    """A trial's record when its fit raised: the first line of why."""
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return {
        "status": "failed",
        "error": msg if isinstance(e, FeatcacheError) else f"{type(e).__name__}: {msg}",
        "seconds": time.perf_counter() - t0,
    }


def _scored(accs, bals, f1s, notes: list[str], t0: float, c0: float) -> dict[str, Any]:
    """A finished trial's record: fold means (accuracy is the score), time and the solver's warnings."""
    return {
        "status": "ok",
        "score": float(np.mean(accs)),
        "score_std": float(np.std(accs)) if len(accs) > 1 else 0.0,
        "balanced_accuracy": float(np.mean(bals)),
        "macro_f1": float(np.mean(f1s)),
        "folds": len(accs),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "pid": os.getpid(),
        "warning": "; ".join(notes[:3]),
    }


def run_trial(data, cand: Candidate, plan: Plan, fraction: float, seed: int) -> dict[str, Any]:
    """Fit and score one candidate (all folds). Runs in a joblib worker; returns plain data only."""
    from pipeline.heads.fitting import fit_model, predict_rows

    t0, c0 = time.perf_counter(), time.process_time()
    accs, bals, f1s, notes = [], [], [], []
    try:
        for fit_rows, eval_rows, es_rows in plan.folds:
            rows = _subset(fit_rows, plan.rank, fraction)
            fitted = fit_model(data, rows, es_rows, cand.head, cand.params, list(cand.transforms), seed=seed)
            notes += [n for n in fitted.notes if n not in notes]
            pred = predict_rows(fitted.model, data, eval_rows, plan.n_classes)
            accs.append(float(np.mean(pred.y_true == pred.y_pred)))
            bals.append(balanced_accuracy(pred.y_true, pred.y_pred))
            f1s.append(macro_f1(pred.y_true, pred.y_pred))
    except Exception as e:  # noqa: BLE001 - one failing candidate must not end the search
        return _failed(e, t0)
    return _scored(accs, bals, f1s, notes, t0, c0)


def append_trial(path: Path, record: dict[str, Any]) -> None:
    """One line, flushed and fsynced: a kill loses at most the trial being written."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")  # a torn line from a killed run stays on its own line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class SearchRun:
    dir: Path
    strategy: str
    leaderboard: list[dict[str, Any]]
    best: dict[str, Any] | None
    n_candidates: int
    n_run: int  # trials fitted by this call
    n_reused: int  # trials found finished in trials.jsonl
    seconds: float
    cv: int
    notes: list[str] = field(default_factory=list)

    @property
    def best_toml(self) -> Path:
        return self.dir / "best.toml"

    def summary(self, top: int = 30) -> str:
        metric = f"{self.cv}-fold CV accuracy" if self.cv else "val accuracy"
        lines = [
            f"search: {self.strategy} · {self.n_candidates} candidates · {self.n_run} trials run, {self.n_reused} reused"
            f" · {self.seconds:.1f} s · ranked by {metric}",
            "",
            f"{'#':>3} {'score':>7} {'±':>6} {'bal_acc':>7} {'rows':>5} {'fit_s':>6}  {'head':<12} {'layer':<16} {'transforms':<22} params",
        ]
        for row in self.leaderboard[:top]:
            if row["status"] != "ok":
                lines.append(
                    f"{row['rank']:>3} {row['status']:>7} {'':>6} {'':>7} {'':>5} {row['seconds'] or 0:>6.1f}  {row['head']:<12} {row['layer'][:16]:<16} {row['transforms'][:22]:<22} {row['params']}  ({row['error']})"
                )
                continue
            warn = "  ! " + row["warning"].split(":")[0] if row.get("warning") else ""
            lines.append(
                f"{row['rank']:>3} {row['score']:>7.4f} {row['score_std']:>6.3f} {row['balanced_accuracy']:>7.4f} {row['resource']:>5.0%}"
                f" {row['seconds']:>6.1f}  {row['head']:<12} {row['layer'][:16]:<16} {row['transforms'][:22]:<22} {row['params']}{warn}"
            )
        if len(self.leaderboard) > top:
            lines.append(f"... {len(self.leaderboard) - top} more in {self.dir / 'leaderboard.csv'}")
        lines.append("")
        if self.best:
            lines.append(
                f"best: {self.best['head']} {self.best['params']} [{self.best['transforms']}] on {self.best['layer']} · score {self.best['score']:.4f}"
            )
            lines.append(f"best config: {self.best_toml}  (featcache train --config {self.best_toml})")
        counts = {
            k: sum(1 for r in self.leaderboard if r["status"] == k) for k in ("cut", "pruned", "failed")
        }
        if any(counts.values()):
            lines.append("not scored in full: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
        lines.append(
            f"all trials: {self.dir / 'leaderboard.csv'} (and .json); plot: {self.dir / 'scores.png'}"
        )
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.append(f"search folder: {self.dir}")
        return "\n".join(lines)


def search_id(space: Space, fingerprint: str, cfg: Config) -> str:
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


def _plan(cache, cv: int, seed: int) -> tuple[Plan, np.ndarray, list[str]]:
    notes = []
    train_rows, val_rows = cache.rows("train"), cache.rows("val")
    if len(train_rows) == 0:
        raise FeatcacheError("no training rows: the cache's train split is empty")
    rank = np.random.default_rng(seed).permutation(cache.n_rows)
    n_classes = len(cache.class_names)
    if cv == 0:
        if len(val_rows) == 0:
            raise FeatcacheError(
                "the val split is empty: set data.val_fraction > 0 and re-extract, or search with --cv K"
            )
        return (
            Plan([(train_rows, val_rows, val_rows)], rank, n_classes),
            np.concatenate([train_rows, val_rows]),
            notes,
        )
    from sklearn.model_selection import KFold, StratifiedKFold

    pool = np.sort(np.concatenate([train_rows, val_rows]))
    y = cache.labels[pool]
    counts = np.bincount(y)
    splitter = StratifiedKFold(cv, shuffle=True, random_state=seed)
    if counts[counts > 0].min() < cv:
        splitter = KFold(cv, shuffle=True, random_state=seed)
        notes.append(f"a class has fewer than {cv} samples: plain (unstratified) k-fold")
    folds = [
        (pool[a], pool[b], None) for a, b in splitter.split(pool, y)
    ]  # early stopping stays inside fit rows
    return Plan(folds, rank, n_classes), pool, notes


def search(cfg: Config, *, fresh: bool = False, progress: Callable[[str], None] | None = None) -> SearchRun:
    """Run (or resume) the search that ``cfg`` describes; write trials, leaderboard and ``best.toml``."""
    from pipeline.cache.locate import resolve_cache, runs_root
    from pipeline.cache.reader import Data, close_cache, use_streaming
    from pipeline.cache.store import FeatureCache
    from pipeline.utils.plots import preload as preload_plots

    t0 = time.perf_counter()
    s, seed = cfg.search, cfg.train.seed
    if progress is None and cfg.extract.progress:
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cache_path = resolve_cache(cfg)
    with FeatureCache(cache_path) as cache:
        space = load_space(s.space, cache.layer_name(cfg.train.layer))
        if s.convertible:
            space = convertible_space(space)
        for e in space.entries:
            for layer in e.layers:
                cache.layer_name(layer)  # a layer this cache does not have fails now, not in a worker
        if s.strategy == "grid":
            candidates = grid_candidates(space)
        elif s.strategy == "random" or not space.finite:
            candidates = random_candidates(space, s.n_trials, seed)
        else:
            candidates = grid_candidates(space)  # halving: the whole grid starts, on small subsets
        plan, rows, notes = _plan(cache, s.cv, seed)
        layers = sorted({c.layer for c in candidates})
        n_bytes = sum(len(rows) * int(cache.dataset(layer).shape[1]) * 4 for layer in layers)
        streamed = use_streaming(cfg.train.streaming, n_bytes)
        data = {layer: Data.from_cache(cache, layer, rows, streamed) for layer in layers}
        fingerprint = cache.fingerprint
        out = runs_root(cfg, cache_path) / f"search-{search_id(space, fingerprint, cfg)}"
        out.mkdir(parents=True, exist_ok=True)
        busy = f"{out}: another featcache search is running this search; wait for it or use another space"
        try:
            with file_lock(out / "search.lock", busy), _cluster(cfg) as client:
                if fresh:
                    for name in (TRIALS_FILE, "leaderboard.csv", "best.toml", "search.json"):
                        (out / name).unlink(missing_ok=True)
                preload_plots()  # while the trials run
                runner = _Runner(
                    out / TRIALS_FILE,
                    data,
                    plan,
                    fingerprint,
                    s.cv,
                    seed,
                    s.n_jobs,
                    progress,
                    client,
                )
                try:
                    if s.strategy == "halving":
                        results = _halving(runner, candidates, len(plan.folds[0][0]), plan.n_classes, notes)
                    else:
                        got = runner.run(candidates, 1.0)
                        results = {c: (1.0, got[c]) for c in candidates}
                finally:
                    runner.close()
                board = _leaderboard(results)
                best = next((r for r in board if r["status"] == "ok"), None)
                run = SearchRun(
                    out,
                    s.strategy,
                    board,
                    best,
                    len(candidates),
                    runner.n_run,
                    runner.n_reused,
                    time.perf_counter() - t0,
                    s.cv,
                    notes,
                )
                _write_outputs(run, cfg, cache_path, fingerprint, space, streamed)
        finally:
            close_cache(cache_path)
    return run


def _cluster(cfg: Config):
    """A Dask client on ``[cluster] address`` (None for this machine): trials then run on its workers,
    the features scattered to each once. Trials are seeded, so either way gives the same scores; the
    journal stays on this machine, so a cluster search resumes like a local one."""
    from pipeline.utils.cluster import cluster_client

    return cluster_client(cfg.cluster.address, quiet=not cfg.extract.progress)


class _Runner:
    """Runs the trials not yet in the journal on worker processes, journaling each as it finishes.

    Trials that share a (layer, transform chain) run back to back, grouped by head: a worker fits each
    chain once per fold and keeps it, ridge alphas share one decomposition, logistic C values warm-start.
    A trial over its time budget (``TRIAL_BUDGET_FACTOR`` × the median finished trial) is cut: its worker
    is killed and replaced, and the trial is journaled as ``cut`` with the reason.
    """

    def __init__(
        self,
        journal: Path,
        data,
        plan: Plan,
        fingerprint: str,
        cv: int,
        seed: int,
        n_jobs: int,
        progress,
        client=None,
    ):
        self.journal, self.data, self.plan = journal, data, plan
        self.fingerprint, self.cv, self.seed, self.n_jobs = fingerprint, cv, seed, n_jobs
        self.progress = progress
        self.n_run = self.n_reused = 0
        self.times: list[float] = []  # seconds of the trials finished by this call
        self.leader: float | None = None
        self._pool = None
        self.client = client

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _get_pool(self):
        from pipeline.utils.workers import Pool, blas_threads, worker_count

        if self._pool is None:
            state = (self.data, self.plan, self.seed)
            n = worker_count(self.n_jobs)
            if self.client is not None:
                from pipeline.utils.cluster import ClusterPool

                self._pool = ClusterPool(self.client, _worker_init, state, _worker_run, blas_threads(n))
            else:
                self._pool = Pool(n, _worker_init, state, _worker_run, blas_threads(n))
        return self._pool

    def run(self, cands: list[Candidate], fraction: float) -> dict[Candidate, dict[str, Any]]:
        done = read_trials(self.journal)
        keys = {c: c.key(self.fingerprint, self.cv, fraction, self.seed) for c in cands}
        results = {c: done[k] for c, k in keys.items() if k in done}
        self.n_reused += len(results)
        for rec in results.values():
            self._lead(rec)
        todo = [c for c in cands if c not in results]
        if not todo:
            return results
        counter = {"total": len(cands), "finished": len(results)}

        def record(cand: Candidate, res: dict[str, Any]) -> None:
            self._record(cand, res, keys[cand], fraction, results)
            counter["finished"] += 1
            if self.progress:
                rec = results[cand]
                score = (
                    f"{rec['score']:.4f}" if rec["status"] == "ok" else f"{rec['status']}: {rec.get('error')}"
                )
                self.progress(
                    f"[{counter['finished']}/{counter['total']}] {cand.label()} rows={fraction:.2f} → {score}"
                    f" ({rec['seconds']:.1f} s)"
                )

        self._get_pool().map(
            plan_tasks(todo, fraction),
            on_item=lambda task, item: record(*item),
            budget=self._budget,
            on_stop=lambda stop: self._stopped(stop, record),
            on_error=lambda task, items, msg: [
                record(c, {"status": "failed", "error": msg.splitlines()[0][:300], "seconds": 0.0})
                for c in task.cands[len(items) :]
            ],
            before_send=self._with_leader,
        )
        return results

    def _with_leader(self, task: _Task) -> _Task:
        return _Task(task.cands, task.fraction, self.leader if self.cv else None)

    def _median(self) -> float | None:
        return float(np.median(self.times)) if len(self.times) >= BUDGET_MIN_TRIALS else None

    def _budget(self, task: _Task, n_done: int) -> float:
        keras = _is_keras(task.cands[min(n_done, len(task.cands) - 1)])
        median = self._median()
        if median is None:
            return BUDGET_EARLY_S * (KERAS_BUDGET_SCALE if keras else 1)
        return max(TRIAL_BUDGET_FACTOR * median, BUDGET_FLOOR_S) * (KERAS_BUDGET_SCALE if keras else 1)

    def _stopped(self, stop, record) -> list[_Task]:
        task: _Task = stop.task
        cand, rest = task.cands[len(stop.items)], task.cands[len(stop.items) + 1 :]
        if stop.reason == "budget":
            median = self._median()
            spent = f"{stop.cpu:.1f} CPU s" if stop.cpu is not None else f"{stop.seconds:.1f} s"
            why = (
                f"cut after {spent}: over the per-trial budget of {TRIAL_BUDGET_FACTOR}× the median "
                f"trial ({median:.2f} s), at least {BUDGET_FLOOR_S:.0f} s"
                if median is not None
                else f"cut after {spent}: over the {BUDGET_EARLY_S:.0f} s budget of the first trials"
            )
            rec = {"status": "cut", "error": why, "seconds": stop.seconds, "cpu_seconds": stop.cpu}
            record(cand, rec)
        else:
            record(cand, {"status": "failed", "error": stop.reason, "seconds": stop.seconds})
        return [_Task(rest, task.fraction)] if rest else []

    def _lead(self, rec: dict[str, Any]) -> None:
        if rec.get("status") == "ok" and (self.leader is None or rec["score"] > self.leader):
            self.leader = float(rec["score"])

    def _record(self, cand: Candidate, res: dict[str, Any], key: str, fraction: float, results) -> None:
        """Journal first, then count: a kill between the two only costs a recount, never a lost trial."""
        rec = {
            "key": key,
            "head": cand.head,
            "params": cand.params,
            "transforms": list(cand.transforms),
            "layer": cand.layer,
            "resource": fraction,
            "cv": self.cv,
            "fingerprint": self.fingerprint,
            "finished": time.time(),
            **res,
        }
        append_trial(self.journal, rec)
        results[cand] = rec
        self.n_run += 1
        if rec["status"] in ("ok", "pruned"):
            self.times.append(float(rec.get("cpu_seconds") or rec["seconds"]))
        self._lead(rec)


@dataclass(frozen=True)
class _Task:
    """Trials one worker runs back to back (one path of a head on one chain), and the score to beat."""

    cands: tuple[Candidate, ...]
    fraction: float
    leader: float | None = None


def plan_tasks(cands: list[Candidate], fraction: float, max_group: int = 16) -> list[_Task]:
    """Group trials by (layer, chain, head, the params a path does not vary); Keras groups first."""
    from pipeline.heads.paths import path_param, path_value

    groups: dict[Any, list[Candidate]] = {}
    for c in cands:
        params = c.params
        name = path_param(c.head, params)
        rest = json.dumps({k: v for k, v in params.items() if k != name}, sort_keys=True) if name else c
        groups.setdefault((c.layer, c.transforms, c.head, rest), []).append(c)
    tasks = []
    for members in groups.values():
        name = path_param(members[0].head, members[0].params)
        if name:
            members.sort(key=lambda c: path_value(c.head, c.params))
        for i in range(0, len(members), max_group):
            tasks.append(_Task(tuple(members[i : i + max_group]), fraction))
    # Keras trials first (the longest), then by layer and chain so a worker reuses what it fitted
    tasks.sort(key=lambda t: (not _is_keras(t.cands[0]), t.cands[0].layer, t.cands[0].transforms))
    return tasks


def _is_keras(cand: Candidate) -> bool:
    from pipeline.heads.registry import HEADS

    spec = HEADS.get(cand.head)
    return spec is not None and spec.kind == "keras"


@dataclass
class _Shared:
    """A worker's state: the data, and what its trials share (prepared chains, paths), most recent last."""

    data: dict
    plan: Plan
    seed: int
    prepared: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def _worker_init(state) -> _Shared:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    data, plan, seed = state
    return _Shared(data, plan, seed)


def _worker_run(shared: _Shared, task: _Task, emit) -> None:
    for cand in task.cands:
        data = shared.data[cand.layer]
        if data.streamed:
            emit((cand, run_trial(data, cand, shared.plan, task.fraction, shared.seed)))
        else:
            emit((cand, shared_trial(shared, cand, task.fraction, task.leader)))


def _prepared(shared: _Shared, cand: Candidate, fold: int, fraction: float):
    """Transforms of ``cand``'s chain fitted on this fold's fit rows, once per worker (a few kept)."""
    from pipeline.heads.fitting import prepare
    from pipeline.heads.transforms import build_transforms

    key = (cand.layer, cand.transforms, fold, fraction)
    if key in shared.prepared:
        shared.prepared[key] = shared.prepared.pop(key)  # most recently used last
        return key, shared.prepared[key]
    data = shared.data[cand.layer]
    fit_rows, eval_rows, es_rows = shared.plan.folds[fold]
    rows = _subset(fit_rows, shared.plan.rank, fraction)
    steps = build_transforms(
        list(cand.transforms), n_samples=len(rows), n_features=data.n_features, seed=shared.seed
    )
    prep = prepare(data, np.sort(rows), es_rows if es_rows is not None and len(es_rows) else None, steps)
    eval_rows = np.sort(eval_rows)
    X_eval = data.take(eval_rows)
    for _, est in steps:
        X_eval = est.transform(X_eval)
    while len(shared.prepared) >= PREPARED_KEPT:
        old = next(iter(shared.prepared))
        del shared.prepared[old]
        shared.paths = {k: v for k, v in shared.paths.items() if k[0] != old}
    shared.prepared[key] = (prep, X_eval, data.labels[eval_rows])
    return key, shared.prepared[key]


def _fit_predict(shared: _Shared, cand: Candidate, prep_key, prep, X_eval) -> np.ndarray:
    from pipeline.heads.fitting import fit_prepared, predict_prepared
    from pipeline.heads.paths import (
        SVM_PARAMS,
        RidgePath,
        SquaredHingeSVM,
        liblinear_is_quick,
        path_param,
        path_value,
        warm_start_from,
    )
    from pipeline.heads.registry import make_head

    params = cand.params
    name = path_param(cand.head, params)
    path_key = (
        prep_key,
        cand.head,
        json.dumps({k: v for k, v in params.items() if k != name}, sort_keys=True),
    )
    if name and cand.head == "ridge":
        make_head(cand.head, params)  # validates the configuration as a plain fit would
        if path_key not in shared.paths:
            shared.paths[path_key] = RidgePath(prep.X, prep.y, X_eval)
        return shared.paths[path_key].predict(float(params["alpha"]))
    head = make_head(cand.head, params, seed=shared.seed, n_train=len(prep.y))
    if name and cand.head == "linear_svm" and not liblinear_is_quick(path_value(cand.head, params), prep.X):
        previous = shared.paths.get(path_key)
        svm = SquaredHingeSVM(**{k: v for k, v in params.items() if k in SVM_PARAMS})
        svm.fit(prep.X, prep.y, coef0=previous.W if previous is not None else None)
        shared.paths[path_key] = svm
        return svm.predict(X_eval)
    if cand.head == "linear_svm" and "dual" not in params:
        head.estimator.set_params(dual=True)  # only reached when C·|x|² is small: coordinate descent is quick
    elif name:
        warm_start_from(head.estimator, shared.paths.get(path_key))
    fit_prepared(head, prep)
    if name and cand.head == "logistic":
        shared.paths[path_key] = head.estimator
    return predict_prepared(head.estimator, X_eval)


def shared_trial(shared: _Shared, cand: Candidate, fraction: float, leader: float | None) -> dict[str, Any]:
    """:func:`run_trial` on work shared across trials; stops early when a fold leaves it far behind ``leader``."""
    t0, c0 = time.perf_counter(), time.process_time()
    accs, bals, f1s, notes = [], [], [], []
    n_folds = len(shared.plan.folds)
    try:
        for fold in range(n_folds):
            prep_key, (prep, X_eval, y_eval) = _prepared(shared, cand, fold, fraction)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y_pred = _fit_predict(shared, cand, prep_key, prep, X_eval)
            notes += [n for n in _warning_notes(caught) if n not in notes]
            accs.append(float(np.mean(y_eval == y_pred)))
            bals.append(balanced_accuracy(y_eval, y_pred))
            f1s.append(macro_f1(y_eval, y_pred))
            if leader is not None and fold + 1 < n_folds and float(np.mean(accs)) < leader - PRUNE_MARGIN:
                return {
                    "status": "pruned",
                    "score": float(np.mean(accs)),
                    "folds": len(accs),
                    "error": f"stopped after {len(accs)} of {n_folds} folds: {np.mean(accs):.4f} is more than "
                    f"{PRUNE_MARGIN} below the leader's {leader:.4f}",
                    "seconds": time.perf_counter() - t0,
                    "cpu_seconds": time.process_time() - c0,
                    "pid": os.getpid(),
                }
    except Exception as e:  # noqa: BLE001 - one failing candidate must not end the search
        return _failed(e, t0)
    return _scored(accs, bals, f1s, notes, t0, c0)


def _warning_notes(caught) -> list[str]:
    out = []
    for w in caught:
        if issubclass(w.category, (UserWarning, RuntimeWarning)):
            msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
            if msg not in out:
                out.append(msg)
    return out


def _halving(runner: _Runner, cands: list[Candidate], n_train: int, n_classes: int, notes: list[str]):
    """Successive halving: all candidates on a small nested subset, the best third on 3× more rows, ..."""
    min_rows = max(30, 5 * n_classes)
    rungs = 1
    while HALVING_FACTOR**rungs <= len(cands):  # 3-8 candidates: 2 rungs, 9-26: 3, ...
        rungs += 1
    while rungs > 1 and n_train / HALVING_FACTOR ** (rungs - 1) < min_rows:
        rungs -= 1
    if rungs == 1:
        notes.append("too few candidates or rows for halving: every candidate ran on all rows")
    results: dict[Candidate, tuple[float, dict[str, Any]]] = {}
    alive = list(cands)
    for r in range(rungs):
        fraction = 1.0 / HALVING_FACTOR ** (rungs - 1 - r)
        got = runner.run(alive, fraction)
        for c in alive:
            results[c] = (fraction, got[c])
        if r < rungs - 1:
            ranked = sorted(alive, key=lambda c: _sort_key(got[c]))
            alive = ranked[: max(1, int(math.ceil(len(alive) / HALVING_FACTOR)))]
    return results


def _sort_key(rec: dict[str, Any]):
    """Best first; equal scores keep the candidates' order (not their timing): the same search, the same
    ranking, in one process or on a cluster."""
    ok = rec.get("status") == "ok"
    return (0 if ok else 1, -(rec.get("score") or 0.0))


def _leaderboard(results: dict[Candidate, tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for cand, (fraction, rec) in results.items():
        rows.append(
            {
                "head": cand.head,
                "layer": cand.layer,
                "transforms": "+".join(cand.transforms) or "none",
                "params": cand.params_json,
                "resource": fraction,
                "status": rec.get("status"),
                "score": rec.get("score"),
                "score_std": rec.get("score_std"),
                "balanced_accuracy": rec.get("balanced_accuracy"),
                "macro_f1": rec.get("macro_f1"),
                "seconds": rec.get("seconds"),
                "error": rec.get("error", ""),
                "warning": rec.get("warning", ""),
                "key": rec.get("key"),
                "_cand": cand,
            }
        )
    rows.sort(key=lambda r: (r["status"] != "ok", -r["resource"], -(r["score"] or 0.0)))  # ties: space order
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{ "
            + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
            + " }"
        )
    raise FeatcacheError(f"cannot write {v!r} to TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", str(k)) else json.dumps(str(k))


def best_toml(best: dict[str, Any], cache_path: Path, seed: int, search_dir: Path, cv: int) -> str:
    """A ``[train]`` fragment: ``featcache train --config best.toml`` refits the winner and evaluates on test."""
    cand: Candidate = best["_cand"]
    params = {k: ("none" if v is None else v) for k, v in cand.params.items()}
    metric = f"{cv}-fold CV accuracy" if cv else "val accuracy"
    return "\n".join(
        [
            f"# Best configuration found by `featcache search` in {search_dir}",
            f"# {metric}: {best['score']:.4f} (the test split was not used; `featcache train` reports it)",
            f"# Use: featcache train --config {search_dir / 'best.toml'}",
            "",
            "[train]",
            f"cache = {_toml_value(str(Path(cache_path).resolve()))}",
            f"layer = {_toml_value(cand.layer)}",
            f"head = {_toml_value(cand.head)}",
            f"transforms = {_toml_value(list(cand.transforms))}",
            f"seed = {seed}",
            f"params = {_toml_value(params)}",
            "",
        ]
    )


def _write_outputs(
    run: SearchRun, cfg: Config, cache_path: Path, fingerprint: str, space: Space, streamed: bool
) -> None:
    fields = [
        "rank",
        "score",
        "score_std",
        "balanced_accuracy",
        "macro_f1",
        "head",
        "layer",
        "transforms",
        "params",
        "resource",
        "seconds",
        "status",
        "error",
        "warning",
        "key",
    ]
    with atomic_path(run.dir / "leaderboard.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in run.leaderboard:
            w.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields}
            )
    board = [{k: v for k, v in row.items() if k != "_cand"} for row in run.leaderboard]
    write_json(run.dir / "leaderboard.json", board)
    _plot(run, space)
    if run.best:
        atomic_write(run.dir / "best.toml", best_toml(run.best, cache_path, cfg.train.seed, run.dir, run.cv))
    summary = {
        "strategy": run.strategy,
        "space": space.source,
        "cv": run.cv,
        "n_candidates": run.n_candidates,
        "n_run": run.n_run,
        "n_reused": run.n_reused,
        "seconds": run.seconds,
        "streamed": streamed,
        "cache": {"path": str(Path(cache_path).resolve()), "fingerprint": fingerprint},
        "best": {k: v for k, v in run.best.items() if k != "_cand"} if run.best else None,
        "search_config": cfg.to_dict()["search"],
        "notes": run.notes,
    }
    write_json(run.dir / "search.json", summary)


def _plot(run: SearchRun, space: Space) -> None:
    """``scores.png``: score against each searched parameter (and head, chain, layer) of the full-size trials."""
    from pipeline.utils.plots import plot_search

    rows = [r for r in run.leaderboard if r["status"] == "ok" and r["resource"] >= 1.0]
    searched = sorted(
        {k for e in space.entries for k, v in e.params.items() if isinstance(v, Dist) or len(v) > 1}
    )
    points = [
        {"head": r["head"], "transforms": r["transforms"], "layer": r["layer"], **json.loads(r["params"])}
        for r in rows
    ]
    columns = ["head", "transforms", "layer"] + searched
    plot_search(
        run.dir / "scores.png", points, [r["score"] for r in rows], columns, "search: score by parameter"
    )
