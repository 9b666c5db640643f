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
from pipeline.utils.config import Config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, atomic_write, file_lock, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


HALVING_FACTOR = 3


DISTRIBUTIONS = ("loguniform", "uniform", "randint")


TRIALS_FILE = "trials.jsonl"


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
    if not p.is_file():
        raise FeatcacheError(f"search space not found: {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FeatcacheError(f"{p}: not valid TOML: {e}") from None
    return parse_space(raw, str(p), default_layer)


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


def run_trial(data, cand: Candidate, plan: Plan, fraction: float, seed: int) -> dict[str, Any]:
    """Fit and score one candidate (all folds). Runs in a joblib worker; returns plain data only."""
    from pipeline.heads.fitting import fit_model, predict_rows

    t0 = time.perf_counter()
    accs, bals, f1s = [], [], []
    try:
        for fit_rows, eval_rows, es_rows in plan.folds:
            rows = _subset(fit_rows, plan.rank, fraction)
            fitted = fit_model(data, rows, es_rows, cand.head, cand.params, list(cand.transforms), seed=seed)
            pred = predict_rows(fitted.model, data, eval_rows, plan.n_classes)
            accs.append(float(np.mean(pred.y_true == pred.y_pred)))
            bals.append(balanced_accuracy(pred.y_true, pred.y_pred))
            f1s.append(macro_f1(pred.y_true, pred.y_pred))
    except Exception as e:  # noqa: BLE001 - one failing candidate must not end the search
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        return {
            "status": "failed",
            "error": msg if isinstance(e, FeatcacheError) else f"{type(e).__name__}: {msg}",
            "seconds": time.perf_counter() - t0,
        }
    return {
        "status": "ok",
        "score": float(np.mean(accs)),
        "score_std": float(np.std(accs)) if len(accs) > 1 else 0.0,
        "balanced_accuracy": float(np.mean(bals)),
        "macro_f1": float(np.mean(f1s)),
        "folds": len(accs),
        "seconds": time.perf_counter() - t0,
        "pid": os.getpid(),
    }


def read_trials(path: Path) -> dict[str, dict[str, Any]]:
    """Finished trials by key; a torn last line (killed mid-write) is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.setdefault(rec["key"], rec)
    return out


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
            f"{'#':>3} {'score':>7} {'±':>6} {'bal_acc':>7} {'rows':>5} {'fit_s':>6}  {'head':<12} {'layer':<16} {'transforms':<18} params",
        ]
        for row in self.leaderboard[:top]:
            if row["status"] != "ok":
                lines.append(
                    f"{row['rank']:>3} {'failed':>7} {'':>6} {'':>7} {'':>5} {'':>6}  {row['head']:<12} {row['layer']:<16} {row['transforms']:<18} {row['params']}  ({row['error']})"
                )
                continue
            lines.append(
                f"{row['rank']:>3} {row['score']:>7.4f} {row['score_std']:>6.3f} {row['balanced_accuracy']:>7.4f} {row['resource']:>5.0%}"
                f" {row['seconds']:>6.1f}  {row['head']:<12} {row['layer'][:16]:<16} {row['transforms'][:18]:<18} {row['params']}"
            )
        if len(self.leaderboard) > top:
            lines.append(f"... {len(self.leaderboard) - top} more in {self.dir / 'leaderboard.csv'}")
        lines.append("")
        if self.best:
            lines.append(
                f"best: {self.best['head']} {self.best['params']} [{self.best['transforms']}] on {self.best['layer']} · score {self.best['score']:.4f}"
            )
            lines.append(f"best config: {self.best_toml}  (featcache train --config {self.best_toml})")
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
    from joblib import Parallel, delayed

    from pipeline.cache.locate import resolve_cache, runs_root
    from pipeline.cache.reader import Data, close_cache, use_streaming
    from pipeline.cache.store import FeatureCache

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
            with file_lock(out / "search.lock", busy):
                if fresh:
                    for name in (TRIALS_FILE, "leaderboard.csv", "best.toml", "search.json"):
                        (out / name).unlink(missing_ok=True)
                runner = _Runner(
                    out / TRIALS_FILE,
                    data,
                    plan,
                    fingerprint,
                    s.cv,
                    seed,
                    s.n_jobs,
                    progress,
                    Parallel,
                    delayed,
                )
                if s.strategy == "halving":
                    results = _halving(runner, candidates, len(plan.folds[0][0]), plan.n_classes, notes)
                else:
                    got = runner.run(candidates, 1.0)
                    results = {c: (1.0, got[c]) for c in candidates}
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


class _Runner:
    """Runs the trials not yet in the journal, in parallel, journaling each as it finishes."""

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
        parallel,
        delayed,
    ):
        self.journal, self.data, self.plan = journal, data, plan
        self.fingerprint, self.cv, self.seed, self.n_jobs = fingerprint, cv, seed, n_jobs
        self.progress, self._parallel, self._delayed = progress, parallel, delayed
        self.n_run = self.n_reused = 0

    def run(self, cands: list[Candidate], fraction: float) -> dict[Candidate, dict[str, Any]]:
        done = read_trials(self.journal)
        keys = {c: c.key(self.fingerprint, self.cv, fraction, self.seed) for c in cands}
        results = {c: done[k] for c, k in keys.items() if k in done}
        self.n_reused += len(results)
        todo = [c for c in cands if c not in results]
        if not todo:
            return results
        total, finished = len(cands), len(results)
        # Keras trials first: they are the longest (TensorFlow's import, then fit), so the short
        # scikit-learn trials fill in around them instead of leaving one worker idle at the end.
        todo.sort(key=lambda c: not _is_keras(c))
        jobs = (
            self._delayed(_trial_job)(self.data[c.layer], c, self.plan, fraction, self.seed) for c in todo
        )
        with warnings.catch_warnings():
            # loky recycles a worker whose memory grew (TensorFlow's import does): expected, not a problem
            warnings.filterwarnings(
                "ignore", message="A worker stopped while some jobs", category=UserWarning
            )
            for cand, res in self._parallel(n_jobs=self.n_jobs, return_as="generator_unordered")(jobs):
                self._record(cand, res, keys[cand], fraction, results)
                finished += 1
                if self.progress:
                    rec = results[cand]
                    score = f"{rec['score']:.4f}" if rec["status"] == "ok" else f"failed: {rec.get('error')}"
                    self.progress(
                        f"[{finished}/{total}] {cand.label()} rows={fraction:.2f} → {score} ({rec['seconds']:.1f} s)"
                    )
        return results

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


def _is_keras(cand: Candidate) -> bool:
    from pipeline.heads.registry import HEADS

    spec = HEADS.get(cand.head)
    return spec is not None and spec.kind == "keras"


def _trial_job(data, cand: Candidate, plan: Plan, fraction: float, seed: int):
    if _is_keras(cand):
        _keep_worker_after_tensorflow_import()
    return cand, run_trial(data, cand, plan, fraction, seed)


def _keep_worker_after_tensorflow_import() -> None:
    """Stop loky from recycling this worker for TensorFlow's one-time import.

    loky restarts a worker whose memory grew 300 MB past its size after its first task, taking that for
    a leak. Importing TensorFlow alone grows it more, so every Keras trial landed in a fresh worker and
    paid the ~4 s import again. A real leak is still caught, above 4 GiB.
    """
    try:
        from joblib.externals.loky import process_executor
    except ImportError:  # pragma: no cover - joblib without its vendored loky
        return
    process_executor._MAX_MEMORY_LEAK_SIZE = max(process_executor._MAX_MEMORY_LEAK_SIZE, 4 << 30)


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
    ok = rec.get("status") == "ok"
    return (0 if ok else 1, -(rec.get("score") or 0.0), rec.get("seconds") or 0.0)


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
                "key": rec.get("key"),
                "_cand": cand,
            }
        )
    rows.sort(key=lambda r: (r["status"] != "ok", -r["resource"], -(r["score"] or 0.0), r["seconds"] or 0.0))
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
        "key",
    ]
    with atomic_path(run.dir / "leaderboard.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in run.leaderboard:
            w.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields}
            )
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
