"""The table ``featcache export`` prints: one line per format (size, parity, score, tolerance, ok)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.utils.config import MULTILABEL


def format_report(report: dict[str, Any]) -> str:
    ml = report.get("task") == MULTILABEL
    score, label, short = ("macro_map", "macro mAP", "ΔmAP") if ml else ("accuracy", "accuracy", "Δacc")
    lines = [
        f"exported {report['run']} ({report['run_kind']}) · input {report['image_size']} px, resize {report['resize']}"
        f", decode {report.get('decode', 'exact')}"
        + (f" · multi-label, {len(report['thresholds'])} classes" if ml else ""),
        f"checked on {report['sample_images']} sample images and {report['eval_images']} {report['eval_split']} images"
        f" (Keras {label} {pct(report[f'keras_{score}'])})",
        "",
        f"{'format':<15} {'size':>10} {'max|Δp|':>10} {label:>9} {short:>7}  tolerance            ok",
    ]
    for fmt, e in report["formats"].items():
        tol = report["tolerances"][fmt]
        if "error" in e or "min_cosine" in tol:
            lines.append(other_line(fmt, e, tol))
            continue
        t = (
            f"|Δp| ≤ {tol['max_abs_diff']:g}"
            if "max_abs_diff" in tol
            else f"mAP drop ≤ {tol['map_drop']:g}"
            if ml
            else f"acc drop ≤ {tol['accuracy_drop']:g}"
        )
        d = "-" if e["max_abs_diff"] is None else f"{e['max_abs_diff']:.1e}"
        delta = "-" if e[f"{score}_delta"] is None else f"{e[f'{score}_delta']:+.3f}"
        lines.append(
            f"{fmt:<15} {e['bytes'] / 1e6:>8.1f}MB {d:>10} {pct(e[score]):>9} {delta:>7}  {t:<20} {'yes' if e['ok'] else 'NO'}"
        )
    lines.append("")
    if any("metadata" in e and e["metadata"] is None for e in report["formats"].values()):
        from pipeline.model.tasks_metadata import MEDIAPIPE_MISSING

        lines.append(f"note: TFLite files written without metadata: {MEDIAPIPE_MISSING}")
    path = next((e["path"] for e in report["formats"].values() if e.get("path")), None)
    if path:
        lines.append(f"files: {Path(path).parent}  (export.json has the details)")
    return "\n".join(lines)


def other_line(fmt: str, e: dict[str, Any], tol: dict[str, float]) -> str:
    """A report line for a format that failed to convert, or for the embedder (cosines, not probabilities)."""
    if "error" in e:
        return f"{fmt:<15} not exported: {e['error']}"
    cache = "-" if e["min_cosine_cache"] is None else f"{e['min_cosine_cache']:.5f}"
    return (
        f"{fmt:<15} {e['bytes'] / 1e6:>8.1f}MB  min cosine {e['min_cosine']:.5f} (Keras), {cache} (cache)"
        f"  ≥ {tol['min_cosine']:g}  {'yes' if e['ok'] else 'NO'}"
    )


def pct(v) -> str:
    return "-" if v is None else f"{v:.4f}"
