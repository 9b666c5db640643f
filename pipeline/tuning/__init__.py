"""Hyperparameter search as a layer: spaces, folds, trials, their scheduling and the leaderboard.

Between ``heads`` (what is fitted) and ``stages`` (``featcache search`` composes this layer on a cache):

* :mod:`~pipeline.tuning.space`: the space's TOML schema, its parser, and the candidates a strategy draws;
* :mod:`~pipeline.tuning.folds`: the rows each trial fits and is scored on (val split or k folds);
* :mod:`~pipeline.tuning.trials`: one trial on every fold, in a worker that shares work across trials;
* :mod:`~pipeline.tuning.scheduler`: the worker pool, time budgets, successive halving, the journal;
* :mod:`~pipeline.tuning.leaderboard`: ranking, and the CSV, JSON, TOML, plot and text it writes;
* :mod:`~pipeline.tuning.refit`: the best trial trained as a run, as ``featcache train`` trains one.

No module here knows a head by name: head-specific shortcuts live in :mod:`pipeline.heads.paths`.
"""

from pipeline.tuning.folds import Plan, add_extras, plan_folds
from pipeline.tuning.leaderboard import (
    SearchRun,
    build_leaderboard,
    score_metric,
    tie_note,
    write_outputs,
    write_summary,
)
from pipeline.tuning.refit import Refit, refit_best
from pipeline.tuning.scheduler import TrialRunner, halving, row_halving, row_halving_note
from pipeline.tuning.space import (
    Candidate,
    Space,
    convertible_space,
    load_space,
    multilabel_space,
    strategy_candidates,
)

__all__ = [
    "Candidate",
    "Plan",
    "Refit",
    "SearchRun",
    "Space",
    "TrialRunner",
    "add_extras",
    "build_leaderboard",
    "convertible_space",
    "halving",
    "load_space",
    "multilabel_space",
    "plan_folds",
    "refit_best",
    "row_halving",
    "row_halving_note",
    "score_metric",
    "strategy_candidates",
    "tie_note",
    "write_outputs",
    "write_summary",
]
