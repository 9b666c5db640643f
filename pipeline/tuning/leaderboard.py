"""Ranking a search's trials and writing what it found: the leaderboard (CSV, JSON), the summary
(``search.json`` and the text the CLI prints, naming the refit run), ``best.toml`` and the ``scores.png`` plot.

Ranking is by score, full-size trials first; equal scores keep the candidates' order, so the same search
ranks the same way in one process or on a cluster.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tuning.refit import Refit, best_train
from pipeline.tuning.space import Candidate, Dist, Space
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_path, atomic_write, write_json


@dataclass
class SearchRun:
    """What a search found: its folder, the ranked trials, the best; :meth:`summary` is what the CLI prints."""

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
    refit: Refit | None = None  # the best configuration trained as a run (``search.refit``)
    multilabel: bool = False  # a multi-label cache: the score is macro mAP

    @property
    def metric(self) -> str:
        """What the score is, in words: ``val accuracy``, ``5-fold CV macro mAP``..."""
        return score_metric(self.cv, self.multilabel)

    @property
    def refit_dir(self) -> Path | None:
        """The refit run's folder: ``predict``, ``finetune`` and ``export`` take it (None: no refit)."""
        return self.refit.run_dir if self.refit else None

    @property
    def best_toml(self) -> Path:
        return self.dir / "best.toml"

    def refit_lines(self) -> list[str]:
        m, name = self.refit.metrics, self.refit.run_dir.name
        what, key = "macro mAP" if self.multilabel else "accuracy", m.score_key
        scores = " · ".join(
            f"{split} {what} {acc:.4f} ({m.split_rows(split)} images)"
            for split, acc in ((s, m.split(s).get(key)) for s in ("val", "test"))
            if acc is not None
        )
        again = " (reused: trained from the same best trial before)" if self.refit.reused else ""
        return [
            f"refit: the best config trained as run {name}" + (f" · {scores}" if scores else "") + again,
            f"refit run: {self.refit.run_dir}  (featcache predict --model {name} IMAGE...; finetune/export --run {name})",
        ]

    def summary(self, top: int = 30) -> str:
        score, second, col = (
            ("macro_map", "micro_map", "micro_map")
            if self.multilabel
            else ("score", "bal_acc", "balanced_accuracy")
        )
        lines = [
            f"search: {self.strategy} · {self.n_candidates} candidates · {self.n_run} trials run, {self.n_reused} reused"
            f" · {self.seconds:.1f} s · ranked by {self.metric}",
            "",
            f"{'#':>3} {score:>7} {'±':>6} {second:>7} {'rows':>5} {'fit_s':>6}  {'head':<12} {'layer':<16} {'transforms':<22} params",
        ]
        for row in self.leaderboard[:top]:
            if row["status"] != "ok":
                lines.append(
                    f"{row['rank']:>3} {row['status']:>7} {'':>6} {'':>7} {'':>5} {row['seconds'] or 0:>6.1f}  {row['head']:<12} {row['layer'][:16]:<16} {row['transforms'][:22]:<22} {row['params']}  ({row['error']})"
                )
                continue
            warn = "  ! " + row["warning"].split(":")[0] if row.get("warning") else ""
            lines.append(
                f"{row['rank']:>3} {row['score']:>7.4f} {row['score_std']:>6.3f} {row[col]:>7.4f} {row['resource']:>5.0%}"
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
        if self.refit:
            lines += self.refit_lines()
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


def score_metric(cv: int, multilabel: bool = False) -> str:
    """What a search's score is, in words (the leaderboard's heading, ``best.toml``'s comment)."""
    return f"{f'{cv}-fold CV' if cv else 'val'} {'macro mAP' if multilabel else 'accuracy'}"


def rank_key(rec: dict[str, Any]):
    """Best first; equal scores keep the candidates' order (not their timing): the same search, the same
    ranking, in one process or on a cluster."""
    ok = rec.get("status") == "ok"
    return (0 if ok else 1, -(rec.get("score") or 0.0))


def build_leaderboard(results: dict[Candidate, tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per trial, ranked: scored trials first, then the most rows (halving's last rung), then score."""
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
                **(
                    {"macro_map": rec.get("score"), "micro_map": rec.get("micro_map")}
                    if "micro_map" in rec
                    else {}
                ),
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


def best_toml(
    best: dict[str, Any], cache_path: Path, seed: int, search_dir: Path, cv: int, multilabel: bool = False
) -> str:
    """A ``[train]`` fragment: ``featcache train --config best.toml`` refits the winner and evaluates on test."""
    train = best_train(best, cache_path, seed)
    metric = score_metric(cv, multilabel)
    return "\n".join(
        [
            f"# Best configuration found by `featcache search` in {search_dir}",
            f"# {metric}: {best['score']:.4f} (the test split was not used; `featcache train` reports it)",
            f"# Use: featcache train --config {search_dir / 'best.toml'}",
            "",
            "[train]",
            *(
                f"{k} = {_toml_value(train[k])}"
                for k in ("cache", "layer", "head", "transforms", "seed", "params")
            ),
            "",
        ]
    )


def write_outputs(run: SearchRun, space: Space, cache_path: Path, seed: int) -> None:
    """``leaderboard.csv`` and ``.json``, ``scores.png``, ``best.toml`` (when a trial succeeded); on a
    multi-label cache the CSV's score columns are ``macro_map`` and ``micro_map``."""
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
    if run.multilabel:
        fields[1:5] = ["macro_map", "score_std", "micro_map"]
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
        text = best_toml(run.best, cache_path, seed, run.dir, run.cv, run.multilabel)
        atomic_write(run.dir / "best.toml", text)


def write_summary(
    run: SearchRun,
    space: Space,
    cache_path: Path,
    fingerprint: str,
    search_config: dict[str, Any],
    streamed: bool,
    state: dict[str, Any] | None = None,
) -> None:
    """``search.json``: what was searched and how, the best trial, and the run the refit trained;
    ``state``: the cache's state it was scored on (:func:`pipeline.cache.state.cache_state`)."""
    summary = {
        "strategy": run.strategy,
        "space": space.source,
        "cv": run.cv,
        **({"task": "multilabel", "metric": run.metric} if run.multilabel else {}),
        "n_candidates": run.n_candidates,
        "n_run": run.n_run,
        "n_reused": run.n_reused,
        "seconds": run.seconds,
        "streamed": streamed,
        "cache": {"path": str(Path(cache_path).resolve()), "fingerprint": fingerprint, "state": state},
        "best": {k: v for k, v in run.best.items() if k != "_cand"} if run.best else None,
        "refit": run.refit.to_json() if run.refit else None,
        "search_config": search_config,
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
    title = "search: macro mAP by parameter" if run.multilabel else "search: score by parameter"
    plot_search(run.dir / "scores.png", points, [r["score"] for r in rows], columns, title)
