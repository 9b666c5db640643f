"""Scheduling trials: the worker pool, each trial's time budget, and successive halving.

Trials not yet in the journal are grouped into tasks (one path of a head on one chain, run back to back by
one worker), sent to worker processes or a Dask cluster, and journaled one by one as they finish. A trial
over its time budget is cut: its worker is killed and replaced, and the trial is journaled as ``cut``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.tuning.folds import EVAL_FLOOR, Plan, subset_size
from pipeline.tuning.leaderboard import rank_records
from pipeline.tuning.space import Candidate
from pipeline.tuning.trials import worker_init, worker_run
from pipeline.utils.journal import append_trial, read_trials

HALVING_FACTOR = 3

# A trial's time budget: TRIAL_BUDGET_FACTOR × the median finished trial, never under BUDGET_FLOOR_S; until
# BUDGET_MIN_TRIALS have finished, BUDGET_EARLY_S. Keras heads (TensorFlow's import, epochs) get KERAS_BUDGET_SCALE ×.
# A task's first trial (it prepares the chain and starts the path: a knn path's neighbour search) is measured
# against the other first trials, the rest against the rest: steps along a path cost a fraction of a second.
# Times count per row: a halving rung on 27× the rows of the first gets 27× the budget.
TRIAL_BUDGET_FACTOR = 20
BUDGET_FLOOR_S = 10.0
BUDGET_MIN_TRIALS = 5
BUDGET_EARLY_S = 120.0
KERAS_BUDGET_SCALE = 4


@dataclass(frozen=True)
class Task:
    """Trials one worker runs back to back (one path of a head on one chain), and the score to beat."""

    cands: tuple[Candidate, ...]
    fraction: float
    leader: float | None = None


def plan_tasks(cands: list[Candidate], fraction: float, max_group: int = 16) -> list[Task]:
    """Group trials by (layer, chain, head, the params a path does not vary); Keras groups first."""
    from pipeline.heads.paths import path_group, path_param, path_value

    groups: dict[Any, list[Candidate]] = {}
    for c in cands:
        shared = path_group(c.head, c.params)
        groups.setdefault((c.layer, c.transforms, c.head, c if shared is None else shared), []).append(c)
    tasks = []
    for members in groups.values():
        name = path_param(members[0].head, members[0].params)
        if name:
            members.sort(key=lambda c: path_value(c.head, c.params))
        for i in range(0, len(members), max_group):
            tasks.append(Task(tuple(members[i : i + max_group]), fraction))
    # Keras trials first (the longest), then by layer and chain so a worker reuses what it fitted
    tasks.sort(key=lambda t: (not _is_keras(t.cands[0]), t.cands[0].layer, t.cands[0].transforms))
    return tasks


def _is_keras(cand: Candidate) -> bool:
    from pipeline.heads.registry import HEADS

    spec = HEADS.get(cand.head)
    return spec is not None and spec.kind == "keras"


class TrialRunner:
    """Runs the trials not yet in the journal on worker processes, journaling each as it finishes.

    Trials that share a (layer, transform chain) run back to back, grouped by head: a worker fits each
    chain once per fold and keeps it, and a head with a path (:mod:`pipeline.heads.paths`) walks it.
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
        self.times: list[float] = []  # seconds of the trials finished by this call, after a task's first
        self.first_times: list[float] = []  # the same of the tasks' first trials
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

                self._pool = ClusterPool(self.client, worker_init, state, worker_run, blas_threads(n))
            else:
                self._pool = Pool(n, worker_init, state, worker_run, blas_threads(n))
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

        def record(cand: Candidate, res: dict[str, Any], first: bool = False) -> None:
            self._record(cand, res, keys[cand], fraction, results, first)
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
            on_item=lambda task, item: record(*item, first=item[0] == task.cands[0]),
            budget=self._budget,
            on_stop=lambda stop: self._stopped(stop, record),
            on_error=lambda task, items, msg: [
                record(c, {"status": "failed", "error": msg.splitlines()[0][:300], "seconds": 0.0})
                for c in task.cands[len(items) :]
            ],
            before_send=self._with_leader,
        )
        return results

    def _with_leader(self, task: Task) -> Task:
        return Task(task.cands, task.fraction, self.leader if self.cv else None)

    def _median(self, first: bool = False, fraction: float = 1.0) -> float | None:
        """The median finished trial's seconds (first trials of tasks, or the others) at ``fraction`` of
        the rows (the times are kept per row: :meth:`_record`)."""
        times = self.first_times if first else self.times
        return float(np.median(times)) * fraction if len(times) >= BUDGET_MIN_TRIALS else None

    def _budget(self, task: Task, n_done: int) -> float:
        keras = _is_keras(task.cands[min(n_done, len(task.cands) - 1)])
        median = self._median(first=n_done == 0, fraction=task.fraction)
        if median is None:
            return BUDGET_EARLY_S * (KERAS_BUDGET_SCALE if keras else 1)
        return max(TRIAL_BUDGET_FACTOR * median, BUDGET_FLOOR_S) * (KERAS_BUDGET_SCALE if keras else 1)

    def _stopped(self, stop, record) -> list[Task]:
        task: Task = stop.task
        cand, rest = task.cands[len(stop.items)], task.cands[len(stop.items) + 1 :]
        if stop.reason == "budget":
            median = self._median(first=not stop.items, fraction=task.fraction)
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
        return [Task(rest, task.fraction)] if rest else []

    def _lead(self, rec: dict[str, Any]) -> None:
        if rec.get("status") == "ok" and (self.leader is None or rec["score"] > self.leader):
            self.leader = float(rec["score"])

    def _record(
        self, cand: Candidate, res: dict[str, Any], key: str, fraction: float, results, first: bool = False
    ) -> None:
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
            spent = float(rec.get("cpu_seconds") or rec["seconds"])
            (self.first_times if first else self.times).append(spent / max(fraction, 1e-9))
        self._lead(rec)


ROW_START_DIVISOR = (
    20  # row halving's first rung: about search.halving_rows / this (5,000 rows at the default)
)


def row_halving(strategy: str, n_fit: int, threshold: int, n_cands: int) -> bool:
    """Whether a ``random`` or ``grid`` search runs successive halving over rows (:func:`halving`):
    its fit rows reach ``search.halving_rows`` (``threshold``, 0 = never) and it has candidates to drop.
    ``halving`` always has rungs; small searches score every candidate on all rows."""
    return strategy in ("random", "grid") and 0 < threshold <= n_fit and n_cands >= HALVING_FACTOR


def rung_count(n_cands: int, n_fit: int, first_rows: float) -> int:
    """Successive halving's rungs, the one rule: one more for each factor of 3 in the candidates (3-8: 2,
    9-26: 3, 27-80: 4, 81-242: 5, ...), fewer while the first rung (``n_fit`` / 3^(rungs - 1)) would hold
    under ``first_rows``."""
    rungs = 1
    while HALVING_FACTOR**rungs <= n_cands:
        rungs += 1
    while rungs > 1 and n_fit / HALVING_FACTOR ** (rungs - 1) < first_rows:
        rungs -= 1
    return rungs


def rung_fractions(rungs: int) -> list[float]:
    """Each rung's share of the fit rows: ..., 1/9, 1/3, 1."""
    return [1.0 / HALVING_FACTOR ** (rungs - 1 - r) for r in range(rungs)]


def min_rung_rows(n_classes: int, threshold: int = 0) -> float:
    """The fewest rows a first rung may hold: 5 per class (at least 30) and, when halving over rows,
    ``search.halving_rows`` / :data:`ROW_START_DIVISOR` (so a search at the threshold runs 3 rungs,
    and each 3× more rows adds one while candidates remain to drop)."""
    return max(30, 5 * n_classes, threshold / ROW_START_DIVISOR)


def row_halving_note(n_fit: int, threshold: int, n_cands: int, n_classes: int) -> str:
    """What a search's summary says when :func:`row_halving` applied: the rungs' sizes."""
    rungs = rung_count(n_cands, n_fit, min_rung_rows(n_classes, threshold))
    sizes = ", ".join(f"{subset_size(n_fit, f):,}" for f in rung_fractions(rungs))
    return (
        f"{n_fit} fit rows >= search.halving_rows ({threshold}): successive halving over rows in {rungs}"
        f" rungs of {sizes} rows (the first at least search.halving_rows / {ROW_START_DIVISOR}), every"
        f" candidate on the first, the best third of each rung on the next, each rung scored on the same"
        f" share of the scoring rows (at least {EVAL_FLOOR:,}; the last on all) (set search.halving_rows = 0"
        " to score every candidate on all rows)"
    )


def halving(
    runner: TrialRunner,
    cands: list[Candidate],
    n_train: int,
    n_classes: int,
    notes: list[str],
    threshold: int = 0,
):
    """Successive halving: all candidates on a small nested subset, the best third on 3× more rows, ...
    as many rungs as :func:`rung_count` gives; ``threshold``: ``search.halving_rows`` when halving over
    rows (its first rung then holds at least :func:`min_rung_rows`)."""
    rungs = rung_count(len(cands), n_train, min_rung_rows(n_classes, threshold))
    if rungs == 1:
        notes.append("too few candidates or rows for halving: every candidate ran on all rows")
    results: dict[Candidate, tuple[float, dict[str, Any]]] = {}
    alive = list(cands)
    for r, fraction in enumerate(rung_fractions(rungs)):
        got = runner.run(alive, fraction)
        for c in alive:
            results[c] = (fraction, got[c])
        if r < rungs - 1:
            order = rank_records([(c, fraction, got[c]) for c in alive], runner.plan.resolution_at(fraction))
            ranked = [alive[i] for i in order]
            alive = ranked[: max(1, int(math.ceil(len(alive) / HALVING_FACTOR)))]
    return results
