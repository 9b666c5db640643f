"""A search's journal, ``trials.jsonl``: one JSON line per finished trial, keyed by what defines the trial.

The search appends each trial as it finishes, so a killed search resumes from the journal; ``runs list``
and ``runs show`` read the same file. Both sides live here so the format has one home.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TRIALS_FILE = "trials.jsonl"


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


def read_trials(path: Path) -> dict[str, dict[str, Any]]:
    """A search's finished trials by key (``trials.jsonl``); a torn last line (killed mid-write) is ignored."""
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
