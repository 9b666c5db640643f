"""Whether a run was scored on its cache as it is now: the rule every reader uses (``runs ls``/``runs show``,
the report, :func:`pipeline.utils.runs.best_run`). What a cache's state is, and how it is computed:
:mod:`pipeline.cache.state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: a run's data against its cache now (:func:`run_status`): scored on the cache as it is, on an older state
#: of it (its val or test rows changed since: never ranked against current runs), or it cannot say
CURRENT, STALE, UNKNOWN = "current", "stale", "unknown"
#: the splits a run is scored on: a change in either makes it stale (train rows only change what it learnt)
SCORED_ON = ("val", "test")


def run_status(
    recorded: dict[str, Any] | None,
    counts: dict[str, int | None],
    current: dict[str, dict[str, Any]] | None,
    splits: Sequence[str] = SCORED_ON,
) -> str | None:
    """Whether a run's data is the cache's ``current`` state (:func:`pipeline.cache.state.cache_state`).

    ``recorded``: the state the run recorded (``cache.state``); runs from before it (0.1, 0.2) record only
    row counts (``counts``): a count that differs proves them :data:`STALE`, equal counts leave them
    :data:`UNKNOWN` (ranked with current runs, as they always were; they may have been scored on other rows
    of the same size). None when there is no current state to compare with (the cache is gone)."""
    if current is None:
        return None
    have = {s: (recorded or {}).get(s) or {} for s in splits}
    if all(h.get("digest") for h in have.values()):
        return CURRENT if all(have[s]["digest"] == current[s]["digest"] for s in splits) else STALE
    if any(counts.get(s) is not None and counts[s] != current[s]["n"] for s in splits):
        return STALE
    return UNKNOWN


def ranked(row: dict[str, Any]) -> bool:
    """Whether a row may be ranked against the cache's current runs: not :data:`STALE`."""
    return row.get("state") != STALE
