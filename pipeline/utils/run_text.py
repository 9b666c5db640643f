"""What ``featcache runs ls`` and ``runs show`` print: the rows of :mod:`pipeline.utils.runs` as text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.utils.config import MULTILABEL


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def _score(r: dict[str, Any], split: str) -> str:
    """``runs ls``'s val/test cell: accuracy, or ``mAP 0.87`` (macro mAP) for a multi-label run or search."""
    if r.get("task") != MULTILABEL:
        return _fmt(r[f"{split}_accuracy"])
    v = r.get(f"{split}_macro_map")
    return f"mAP {v:.2f}" if isinstance(v, float) else "-"


#: how ``runs ls`` marks a row's data (:func:`pipeline.utils.runs.run_status`)
MARKS = {"current": "", "stale": "stale", "unknown": "?", None: ""}
STALE_NOTE = (
    "stale: scored on an older state of its cache (its val or test rows changed since); never ranked against"
    " current runs: train it again to compare"
)
UNKNOWN_NOTE = "?: a run from before featcache recorded its data; its val/test sizes match the cache's"


def _n(v: Any) -> str:
    return "-" if v is None else str(v)


def format_runs(rows: Sequence[dict[str, Any]]) -> str:
    """``runs ls``: one line a run (id, kind, head, val and test accuracy or ``mAP`` macro mAP with the
    rows each was scored on, created, and ``stale`` or ``?`` for runs not scored on the cache as it is)."""
    width = max([len(r["id"]) for r in rows] + [2])
    lines = [
        f"{'id':<{width}}  {'kind':<8} {'head':<13} {'val_acc':>8} {'test_acc':>8} {'n_val':>6} {'n_test':>6}"
        "  created              data"
    ]
    for r in rows:
        lines.append(
            f"{r['id']:<{width}}  {r['kind']:<8} {str(r['head'])[:13]:<13} {_score(r, 'val'):>8}"
            f" {_score(r, 'test'):>8} {_n(r.get('val_n')):>6} {_n(r.get('test_n')):>6}  {r['created']:<20}"
            f" {MARKS.get(r.get('state'), '')}".rstrip()
        )
    states = {r.get("state") for r in rows}
    return "\n".join(
        lines + [n for s, n in (("stale", STALE_NOTE), ("unknown", UNKNOWN_NOTE)) if s in states]
    )


def no_runs(root: Path, cache: Path) -> str:
    """``runs ls`` with no run of the selected cache: one line, naming the other caches' runs if any."""
    from pipeline.utils.runs import list_runs

    others = list_runs(root)
    if others:
        return (
            f"no runs of {cache.name} in {root}; it holds {len(others)} runs of other caches:"
            " `featcache runs ls --all` lists them"
        )
    return f"no runs in {root}: run `featcache train` first"


def format_cache_runs(groups: Sequence[Any], root: Path) -> str:
    """``runs ls --all``: a header line per cache (file name, dataset, source, settings), then its runs."""
    if not groups:
        return f"no runs in {root}: run `featcache train` first"
    out = []
    for g in groups:
        i = g.info
        where = "" if g.found else " · cache file not found (staleness unknown)"
        out.append(
            f"cache {g.name} · dataset {_fmt(i.get('dataset'))} · source {_fmt(i.get('source'))}"
            f" · {_fmt(i.get('backbone'))}, {_fmt(i.get('image_size'))} px{where}"
        )
        out += [format_runs(g.rows), ""]
    return "\n".join(out).rstrip()


def format_run(info: dict[str, Any]) -> str:
    """``runs show``: the run's settings, val/test metrics, per-class scores (test) and files."""
    lines = [
        f"{k:>12}: {_fmt(info.get(k))}" for k in ("id", "kind", "head", "layer", "transforms", "created")
    ]
    lines.append(f"{'params':>12}: {json.dumps(info.get('params') or {}, sort_keys=True)}")
    lines.append(f"{'data':>12}: {_data(info)}")
    if info["kind"] == "search":
        lines.append(
            f"{'strategy':>12}: {_fmt(info.get('strategy'))} · {info['n_trials']} trials · {info['metric']}"
        )
        lines.append("")
        lines.append(
            f"{'score':>7} {'rows':>5} {'fit_s':>6}  {'head':<13} {'layer':<16} {'transforms':<18} params"
        )
        for t in info["trials"][:15]:
            score = _fmt(t["val_accuracy"]) if t["status"] == "ok" else "failed"
            lines.append(
                f"{score:>7} {(t['resource'] or 0):>5.0%} {(t['seconds'] or 0):>6.1f}  {t['head']:<13}"
                f" {str(t['layer'])[:16]:<16} {t['transforms'][:18]:<18} {json.dumps(t['params'], sort_keys=True)}"
            )
        if len(info["trials"]) > 15:
            lines.append(f"... {len(info['trials']) - 15} more (--json lists them all)")
    else:
        lines += _format_metrics(info.get("metrics") or {})
        lines.append(f"{'files':>12}: {', '.join(info['files'])}")
        if any(str(name).endswith(".joblib") for name in info.get("model_files") or []):
            lines.append(
                f"{'note':>12}: its model is a pickle (featcache 0.1), loaded only with --trust-pickle;"
                f" `featcache runs upgrade {info['id']} --trust-pickle` converts it once, if you trust its author"
            )
    lines.append(f"{'path':>12}: {info['path']}")
    return "\n".join(lines)


def _data(info: dict[str, Any]) -> str:
    """``runs show``'s data line: the cache, the val/test rows the run was scored on, and whether that is
    the cache as it is now."""
    state, now = info.get("state"), info.get("now") or {}
    said = {
        "current": "the cache's current rows",
        "stale": f"STALE (the cache has val {_n(now.get('val'))}, test {_n(now.get('test'))} rows now): "
        + STALE_NOTE.split(": ", 1)[1],
        "unknown": "state unknown (a run from before featcache recorded it; val/test sizes match the cache's)",
        None: "cache not found: cannot tell whether it is stale",
    }[state]
    return f"{_fmt(info.get('cache'))} · val {_n(info.get('val_n'))} rows · test {_n(info.get('test_n'))} rows · {said}"


def _format_metrics(m: dict[str, Any]) -> list[str]:
    if m.get("task") == MULTILABEL:
        return _format_multilabel(m)
    lines = ["", f"{'split':<6} {'n':>6} {'accuracy':>9} {'bal_acc':>8} {'macro_f1':>9}"]
    for split in ("val", "test"):
        s = m.get(split) or {}
        lines.append(
            f"{split:<6} {s.get('n', 0):>6} {_fmt(s.get('accuracy')):>9} {_fmt(s.get('balanced_accuracy')):>8}"
            f" {_fmt(s.get('macro_f1')):>9}"
        )
    per_class = (m.get("test") or {}).get("per_class") or {}
    if per_class:
        lines += ["", f"{'class (test)':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'n':>6}"]
        for name, c in per_class.items():
            lines.append(
                f"{str(name)[:20]:<20} {c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>7.3f} {c['support']:>6}"
            )
    return lines + [""] + [f"{'note':>12}: {n}" for n in m.get("notes", [])]


def _format_multilabel(m: dict[str, Any]) -> list[str]:
    """A multi-label run's val/test mAP and F1, then its per-class AP, threshold and F1 on test."""
    lines = [
        "",
        f"{'split':<6} {'n':>6} {'macro_mAP':>9} {'micro_mAP':>9} {'macro_f1':>9} {'subset_acc':>10}",
    ]
    for split in ("val", "test"):
        s = m.get(split) or {}
        lines.append(
            f"{split:<6} {s.get('n', 0):>6} {_fmt(s.get('macro_map')):>9} {_fmt(s.get('micro_map')):>9}"
            f" {_fmt(s.get('macro_f1')):>9} {_fmt(s.get('subset_accuracy')):>10}"
        )
    per_class = (m.get("test") or {}).get("per_class") or {}
    if per_class:
        lines += ["", f"{'class (test)':<20} {'ap':>7} {'threshold':>9} {'f1':>7} {'n':>6}"]
        for name, c in per_class.items():
            lines.append(
                f"{str(name)[:20]:<20} {_fmt(c.get('ap')):>7} {c['threshold']:>9.3f} {c['f1']:>7.3f} {c['support']:>6}"
            )
    return lines + [""] + [f"{'note':>12}: {n}" for n in m.get("notes", [])]
