"""Ranking a search's trials and writing what it found: the leaderboard (CSV, JSON), the summary
(``search.json`` and the text the CLI prints, naming the refit run), ``best.toml`` and the ``scores.png`` plot.

Ranking (:func:`rank_records`) is by score, full-size trials first. Scores closer than the scored rows can
resolve tie (an accuracy on n rows: under 1/n apart; a macro mAP: equal): a tie goes to the lower val log loss (a trial without one, a
margin head's or an old journal's, after), then the simpler model
(:func:`pipeline.heads.registry.model_complexity`), then the score, then the candidates' order, so the same
search ranks the same way in one process or on a cluster.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.heads.registry import model_complexity
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
            f"{'#':>3} {score:>7} {'±':>6} {second:>7} {'logloss':>7} {'rows':>5} {'fit_s':>6}  {'head':<12} {'layer':<16} {'transforms':<22} params",
        ]
        for row in self.leaderboard[:top]:
            if row["status"] != "ok":
                lines.append(
                    f"{row['rank']:>3} {row['status']:>7} {'':>6} {'':>7} {'':>7} {'':>5} {row['seconds'] or 0:>6.1f}  {row['head']:<12} {row['layer'][:16]:<16} {row['transforms'][:22]:<22} {row['params']}  ({row['error']})"
                )
                continue
            warn = "  ! " + row["warning"].split(":")[0] if row.get("warning") else ""
            loss = "-" if row.get("log_loss") is None else f"{row['log_loss']:.4f}"
            lines.append(
                f"{row['rank']:>3} {row['score']:>7.4f} {row['score_std']:>6.3f} {row[col]:>7.4f} {loss:>7} {row['resource']:>5.0%}"
                f" {row['seconds']:>6.1f}  {row['head']:<12} {row['layer'][:16]:<16} {row['transforms'][:22]:<22} {row['params']}{warn}"
            )
        if len(self.leaderboard) > top:
            lines.append(f"... {len(self.leaderboard) - top} more in {self.dir / 'leaderboard.csv'}")
        lines.append("")
        if self.best:
            lines.append(
                f"best: {self.best['head']} {self.best['params']} [{self.best['transforms']}] on {self.best['layer']} · score {self.best['score']:.4f}"
            )
            use = (
                "the refit run below is it, trained; train --config only to change a setting"
                if self.refit
                else f"featcache train --config {self.best_toml}"
            )
            lines.append(f"best config: {self.best_toml}  ({use})")
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


def rank_records(items: list[tuple[Candidate, float, dict[str, Any]]], resolution: float) -> list[int]:
    """The order of ``(candidate, fraction, record)`` items, best first: scored trials, then the most rows
    (halving's last rung), then score; scores less than ``resolution`` below the best remaining one tie with
    it (:attr:`pipeline.tuning.folds.Plan.resolution`: the scored rows cannot tell them apart) and go by val
    log loss (unknown last), the simpler model, the score, the candidates' order (stable: not their timing)."""
    tol = max(resolution - 1e-9, 1e-12)

    def tie_key(i: int):
        cand, _, rec = items[i]
        loss = rec.get("log_loss")
        return (
            loss is None,
            loss or 0.0,
            model_complexity(cand.head, cand.params, cand.transforms),
            -(rec.get("score") or 0.0),
        )

    def coarse(i: int):
        _, fraction, rec = items[i]
        return (rec.get("status") != "ok", -fraction)

    order = sorted(range(len(items)), key=lambda i: (coarse(i), -(items[i][2].get("score") or 0.0)))
    out: list[int] = []
    while order:
        head = order[0]
        if items[head][2].get("status") != "ok":
            out += order
            break
        top = items[head][2]["score"]
        group = [i for i in order if coarse(i) == coarse(head) and top - items[i][2]["score"] < tol]
        out += sorted(group, key=tie_key)
        taken = set(group)
        order = [i for i in order if i not in taken]
    return out


def top_tie(board: list[dict[str, Any]], resolution: float) -> int:
    """How many ranked rows tie with the first (scores less than ``resolution`` apart, same rows)."""
    if not board or board[0]["status"] != "ok":
        return 0
    tol, first = max(resolution - 1e-9, 1e-12), board[0]
    same = [r for r in board if r["status"] == "ok" and r["resource"] == first["resource"]]
    return sum(1 for r in same if first["score"] - r["score"] < tol)


def tie_note(board: list[dict[str, Any]], n_eval: int, resolution: float, metric: str) -> str | None:
    """One line when the top trials tie: the scored rows are too few to separate them, so the tie-breaks chose."""
    n = top_tie(board, resolution)
    if n < 2:
        return None
    why = f"; {n_eval} scored rows cannot separate scores less than 1/{n_eval} apart" if resolution else ""
    return (
        f"{n} trials tie at the top ({metric} {board[0]['score']:.4f}{why}): ranked by val log loss, "
        "then the simpler model (docs/stages.md#featcache-search)"
    )


def build_leaderboard(
    results: dict[Candidate, tuple[float, dict[str, Any]]], resolution: float
) -> list[dict[str, Any]]:
    """One row per trial, ranked by :func:`rank_records` (``resolution``: the tie width of the score)."""
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
                "log_loss": rec.get("log_loss"),
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
    order = rank_records([(r["_cand"], r["resource"], r) for r in rows], resolution)
    rows = [rows[i] for i in order]
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
    """A ``[train]`` fragment: the winner as ``featcache train --config best.toml`` trains it (what the refit
    already did; edit a setting first to train a variant)."""
    train = best_train(best, cache_path, seed)
    metric = score_metric(cv, multilabel)
    return "\n".join(
        [
            f"# Best configuration found by `featcache search` in {search_dir}",
            f"# {metric}: {best['score']:.4f} (the test split was not used; `featcache train` reports it)",
            "# With search.refit (the default) the search already trained it as a run (search.json: refit.run);",
            f"# to train it again with a setting changed: featcache train --config {search_dir / 'best.toml'}",
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
        "log_loss",
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
