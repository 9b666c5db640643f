"""A multi-label model's per-class decision thresholds as written in JSON, checked in one place: a run's
``metrics.json`` and an export's ``export.json`` may come from anyone, so a missing class, an extra one or a
value that is not a number in [0, 1] is one clear error naming the file, never a KeyError later."""

from __future__ import annotations

import math
from typing import Any

from pipeline.utils.errors import FeatcacheError
from pipeline.utils.sections import MULTILABEL


def valid_thresholds(t: Any, names: Any) -> bool:
    """Whether ``t`` maps exactly the class ``names`` to finite numbers in [0, 1]."""
    return (
        isinstance(names, list)
        and isinstance(t, dict)
        and set(t) == {str(n) for n in names}
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
            for v in t.values()
        )
    )


def checked_thresholds(t: Any, names: Any, source: Any, what: str = "file") -> list[float]:
    """``t``'s thresholds in ``names`` order; anything else raises naming ``source`` (the file)."""
    if not valid_thresholds(t, names):
        raise FeatcacheError(
            f"{source}: not a {what} featcache wrote (a multi-label model has task: {MULTILABEL} and thresholds:"
            " a threshold in [0, 1] for each of its class_names)"
        )
    return [float(t[str(n)]) for n in names]
