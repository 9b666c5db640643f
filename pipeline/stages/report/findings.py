"""The report's audit section: what ``featcache audit`` found in this cache, read back from the CSV files it
wrote beside it (:mod:`pipeline.cache.audit_files`): the most suspected label errors with their thumbnails,
and the near-duplicate pairs that straddle splits (leaks: a test image whose twin is in train)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from pipeline.cache.audit_files import AuditFindings, read_audit
from pipeline.stages.report.html import img
from pipeline.stages.report.sections import read_thumbnails

AUDIT_SHOWN = 12  # suspected label errors shown with thumbnails
LEAKS_SHOWN = 6  # leaking pairs shown side by side


def audit_section(cache_path: Path, meta: dict, notes: list[str]) -> tuple[str, AuditFindings | None]:
    """The section's HTML and the findings (None: no audit beside the cache, and the section says so)."""
    found = read_audit(cache_path)
    if found is None:
        return (
            '<h2 id="audit">Audit</h2><p class="note">no audit of this cache: <code>featcache audit</code> '
            "finds likely label errors and near-duplicate images (leaks across splits) and this page then shows them.</p>",
            None,
        )
    issues, leaks = found.label_issues[:AUDIT_SHOWN], found.leaks[:LEAKS_SHOWN]
    keys = list(dict.fromkeys([r["key"] for r in issues] + [k for p in leaks for k in (p["a"], p["b"])]))
    pngs, why = read_thumbnails(meta, keys) if keys else ({}, "")
    if why:
        notes.append(f"audit: {why}")
    stale = (
        '<p class="note">the cache changed after this audit: run <code>featcache audit</code> again.</p>'
        if found.older_than_cache
        else ""
    )
    files = " and ".join(f"<code>{escape(str(p))}</code>" for p in found.paths.values())
    head = (
        f'<h2 id="audit">Audit</h2><p class="sub">{len(found.label_issues)} likely label errors · '
        f"{len(found.pairs)} near-duplicate pairs, {len(found.leaks)} across splits · from {files}</p>{stale}"
    )
    return head + _issues(issues, pngs) + _leaks(found, leaks, pngs), found


def _thumb(pngs: dict[str, bytes], key: str) -> str:
    return img(pngs[key], key, "thumb audit") if key in pngs else "<div>(image unavailable)</div>"


def _issues(issues: list[dict[str, str]], pngs: dict[str, bytes]) -> str:
    if not issues:
        return "<h3>Suspected label errors</h3><p>none found.</p>"
    figs = []
    for r in issues:
        if "suggested" in r:  # single-label: the given class and the one the out-of-fold model prefers
            what = f"given {escape(r['given'])}<br>suggested <b>{escape(r['suggested'])}</b>"
        else:  # multi-label: one suspect label of the image
            what = f"{escape(r['issue'])} <b>{escape(r['class'])}</b> (p {float(r['probability']):.2f})"
        figs.append(
            f'<figure>{_thumb(pngs, r["key"])}<figcaption title="{escape(r["key"])}">{escape(r["split"])} · '
            f"{what} · score {float(r['score']):.2f}</figcaption></figure>"
        )
    return (
        '<h3>Suspected label errors</h3><p class="sub">most suspicious first (confident learning on out-of-fold'
        f' probabilities)</p><div class="thumbs">{"".join(figs)}</div>'
    )


def _leaks(found: AuditFindings, leaks: list[dict[str, str]], pngs: dict[str, bytes]) -> str:
    within = len(found.pairs) - len(found.leaks)
    if not leaks:
        return f"<h3>Leaking near-duplicates</h3><p>none across splits ({within} within a split).</p>"
    rows = "".join(
        f"<tr><td>{_thumb(pngs, p['a'])}</td><td>{_thumb(pngs, p['b'])}</td>"
        f'<td class="n">{float(p["similarity"]):.4f}</td><td>{escape(p["split_a"])} / {escape(p["split_b"])}</td>'
        f"<td><code>{escape(p['a'])}</code><br><code>{escape(p['b'])}</code></td></tr>"
        for p in leaks
    )
    more = len(found.leaks) - len(leaks)
    return (
        '<h3>Leaking near-duplicates</h3><p class="sub">the same picture on both sides of a split inflates its '
        f"val/test scores; {within} more pairs lie within a split"
        + (f", {more} more leaks in the CSV" if more else "")
        + '</p><table class="leaks"><thead><tr><th>a</th><th>b</th><th>cosine</th><th>splits</th><th>keys</th></tr>'
        f"</thead><tbody>{rows}</tbody></table>"
    )
