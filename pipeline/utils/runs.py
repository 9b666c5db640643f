"""Run folders: their layout, their metrics, their manifest, and finding and listing them.

``<runs>/<id>/`` holds the model (``model.skops``; or ``transforms.skops`` + ``head.keras`` + ``head.json``
for Keras heads; ``.joblib`` pickles in runs written by 0.1), ``metrics.json`` (read through
:class:`RunMetrics`), plots and ``misclassified.csv``; fine-tuned runs live in ``<runs>/finetune/<id>/``,
searches in ``<runs>/search-<id>/``. ``manifest.json`` is written last with the sha256 of every other file:
a folder without it is an unfinished run, and :func:`verify_run` refuses any file whose bytes changed.
Loading a model (:func:`pipeline.heads.persist.load_model`) verifies first, so truncation and accidental
edits are caught before anything is loaded; skops files are then built from trusted types only. A run is
named by its folder, its id or a unique prefix of its id (:func:`find_run`); runs, fine-tuned runs and
searches under a runs folder are listed by :func:`list_runs`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.utils.config import MULTILABEL, SPLITS
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import sha256_file, write_json
from pipeline.utils.journal import TRIALS_FILE, read_trials
from pipeline.utils.staleness import ranked, run_status

MANIFEST = "manifest.json"
METRICS = "metrics.json"
FINETUNED = "finetune"  # <runs>/finetune/<id>: fine-tuned runs
SEARCH_PREFIX = "search-"  # <runs>/search-<id>: searches

RUN_FORMAT = "featcache-run/1"


def new_run_dir(root: str | Path, head: str) -> Path:
    """``<root>/20261124-173000-logistic-ab12``: sortable by time, unique across concurrent runs."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatcacheError(f"runs folder {root}: cannot create ({e.strerror})") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        d = root / f"{stamp}-{head}-{secrets.token_hex(2)}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise FeatcacheError(f"runs folder {root}: cannot find a free run id")  # pragma: no cover


class RunMetrics(dict):
    """A run's ``metrics.json``: the fields the stages read, typed; every other key as in any dict.

    A dict, so runs of every version load as they are, and the metrics are written and shown as JSON
    unchanged (``LoadedRun.metrics`` of the public API included). ``source``: the file it was read from.
    """

    source: Path | None = None

    def _dict(self, key: str) -> dict[str, Any]:
        value = self.get(key)
        return value if isinstance(value, dict) else {}

    @property
    def kind(self) -> str:
        """``finetune`` for a fine-tuned run, else ``train``."""
        return "finetune" if self.get("kind") == "finetune" else "train"

    @property
    def head(self) -> str | None:
        return self.get("head")

    @property
    def layer(self) -> str | None:
        return self.get("layer")

    @property
    def class_names(self) -> list[str]:
        return [str(x) for x in self.get("class_names") or []]

    @property
    def n_features(self) -> int:
        return int(self["n_features"])

    @property
    def calibrated(self) -> bool:
        """Whether the head's scores are ``predict_proba`` (not a softmax of margins)."""
        return str(self.get("probabilities", "predict_proba")) == "predict_proba"

    @property
    def decode(self) -> str:
        """The ``data.decode`` policy a fine-tuned run records for its images (runs from before it: exact)."""
        return str(self.get("decode", "exact"))

    @property
    def cache(self) -> dict[str, Any]:
        """What the run says of its cache: ``path``, ``fingerprint``, ``backbone``, ``rows``..."""
        return self._dict("cache")

    @property
    def cache_path(self) -> Path | None:
        """The cache the run was trained on, or None when it does not say."""
        return Path(self.cache["path"]).resolve() if self.cache.get("path") else None

    @property
    def cache_fingerprint(self) -> str | None:
        return self.cache.get("fingerprint")

    @property
    def cache_name(self) -> str | None:
        """The file name of the cache the run was trained on (what :func:`run_of_cache` matches)."""
        return Path(str(self.cache["path"])).name if self.cache.get("path") else None

    def split_rows(self, name: str) -> int | None:
        """How many rows of split ``name`` the run was scored on: its recorded state, else its scores'
        ``n``, else the split counts older runs record; None when it does not say."""
        for n in (
            (self.cache.get("state") or {}).get(name, {}).get("n"),
            self.split(name).get("n") if name != "train" else None,
            (self.cache.get("rows") or {}).get(name),
        ):
            if isinstance(n, int):
                return n
        return None

    @property
    def config(self) -> dict[str, Any]:
        return self._dict("config")

    def split(self, name: str) -> dict[str, Any]:
        """The scores on ``val`` or ``test`` (empty when the split had no rows)."""
        return self._dict(name)

    @property
    def multilabel(self) -> bool:
        """Whether the run's head is multi-label (one-vs-rest, per-class ``thresholds``)."""
        return self.get("task") == MULTILABEL

    @property
    def thresholds(self) -> list[float]:
        """A multi-label run's decision threshold per class, in :attr:`class_names` order (checked)."""
        from pipeline.utils.thresholds import checked_thresholds

        return checked_thresholds(self.get("thresholds"), self.class_names, self.source or METRICS, "run")

    @property
    def score_key(self) -> str:
        """The headline score of a split: ``macro_map`` for a multi-label run, else ``accuracy``."""
        return "macro_map" if self.multilabel else "accuracy"

    @property
    def val_accuracy(self) -> float | None:
        return self.split("val").get("accuracy")

    @property
    def test_accuracy(self) -> float | None:
        return self.split("test").get("accuracy")


def read_metrics(run_dir: str | Path, *, missing_ok: bool = False) -> RunMetrics:
    """A run's ``metrics.json``; with ``missing_ok`` a missing or unreadable one is empty (falsy)."""
    path = Path(run_dir) / METRICS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if missing_ok:
            return RunMetrics()
        raise FeatcacheError(f"{path}: unreadable ({str(e)[:120]}); refusing to use this run") from None
    if not isinstance(data, dict):
        if missing_ok:
            return RunMetrics()
        raise FeatcacheError(f"{path}: not a JSON object; not a featcache run")
    metrics = RunMetrics(data)
    metrics.source = path
    return metrics


def write_manifest(
    run_dir: Path, kind: str, model_files: Sequence[str], skip: Sequence[str] = (), created: float = 0
) -> dict[str, Any]:
    """Hash every file in the run folder (the model's and the reports') but ``skip``; written last, atomically.

    ``created`` keeps the time of a run whose manifest is rewritten (0 = now)."""
    files = {}
    for p in sorted(run_dir.iterdir()):
        if p.is_file() and p.name not in (MANIFEST, *skip) and not p.name.startswith("."):
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format": RUN_FORMAT,
        "kind": kind,
        "model_files": list(model_files),
        "files": files,
        "created": created or time.time(),
    }
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def verify_run(run_dir: str | Path) -> dict[str, Any]:
    """Check every listed file against its sha256; raise naming the first one that differs or is missing."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise FeatcacheError(f"run folder not found: {run_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatcacheError(
            f"{run_dir}: no {MANIFEST}; the run did not finish or is not a featcache run"
        ) from None
    except (OSError, ValueError) as e:
        raise FeatcacheError(f"{path}: unreadable manifest ({e}); refusing to load this run") from None
    if manifest.get("format") != RUN_FORMAT or not isinstance(manifest.get("files"), dict):
        raise FeatcacheError(f"{path}: not a {RUN_FORMAT} manifest")
    for name, info in manifest["files"].items():
        p = run_dir / name
        if Path(name).name != name or name in ("", ".", "..") or not isinstance(info, dict):
            raise FeatcacheError(f"{path}: lists {name[:80]!r}, not a file of this run; refusing to load it")
        if not p.is_file():
            raise FeatcacheError(f"{p}: listed in the manifest but missing; refusing to load this run")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise FeatcacheError(
                f"{p}: {size} bytes, manifest says {info.get('bytes')} (truncated or replaced); refusing to load"
            )
        if sha256_file(p) != info.get("sha256"):
            raise FeatcacheError(
                f"{p}: sha256 differs from the manifest (file modified or corrupted); refusing to load"
            )
    for name in manifest.get("model_files", []):
        if name not in manifest["files"]:
            raise FeatcacheError(f"{path}: model file {name} is not covered by the manifest")
    return manifest


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def run_of_cache(recorded: dict[str, Any], cache_path: str | Path, fingerprint: str | None = None) -> bool:
    """Whether a run (or search) was made from the cache at ``cache_path``; ``recorded`` is what it says of
    its cache (``path``, ``fingerprint``). Matched by the cache file's *name*, so a moved cache folder
    keeps its runs (caches of two sources may share a fingerprint and a runs folder, never a name); a run
    that records no path is matched by ``fingerprint``, and one that records neither is listed."""
    if recorded.get("path"):
        return Path(str(recorded["path"])).name == Path(cache_path).name
    return recorded.get("fingerprint") in (None, fingerprint)


def run_row(run_dir: Path, current: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One finished run (``train`` or ``finetune``) as a flat row: what ``runs ls`` and the report list;
    ``current``: its cache's state now, to say whether the run is stale (``state``)."""
    m = read_metrics(run_dir, missing_ok=True)
    fit = m.get("fit") or {}
    counts = {s: m.split_rows(s) for s in SPLITS}
    return {
        "id": run_dir.name,
        "kind": m.kind,
        "head": m.head or "?",
        "head_kind": m.get("head_kind"),
        "layer": m.layer,
        "transforms": "+".join(m.get("transforms") or []) or "none",
        "params": m.get("params") or {},
        "val_accuracy": m.val_accuracy,
        "test_accuracy": m.test_accuracy,
        "val_macro_f1": m.split("val").get("macro_f1"),
        "test_macro_f1": m.split("test").get("macro_f1"),
        "seconds": fit.get("seconds"),
        "epochs": fit.get("epochs"),
        "created": m.get("created") or _stamp((run_dir / MANIFEST).stat().st_mtime),
        "source": Path(m["source_run"]).name if m.get("source_run") else None,
        "unfreeze": (m.get("finetune") or {}).get("unfreeze"),
        "fingerprint": m.cache_fingerprint,
        "cache": m.cache_name,
        "val_n": counts["val"],
        "test_n": counts["test"],
        "state": run_status(m.cache.get("state"), counts, current),
        "path": str(run_dir),
        "readable": bool(m),
        **(_map_keys(m.split("val"), m.split("test")) if m.multilabel else {}),
    }


def _map_keys(val: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """A multi-label row's scores: macro mAP where a single-label row has accuracy (``runs ls`` shows it)."""
    return {
        "task": MULTILABEL,
        "val_macro_map": val.get("macro_map"),
        "test_macro_map": test.get("macro_map"),
    }


def search_row(search_dir: Path, current: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A search folder as one row: its best trial (scored on val, or by k-fold CV: ``metric`` says which);
    stale (``state``) when the rows it scored on (val; train and val with CV) changed since."""
    info = _read_json(search_dir / "search.json") or {}
    cache = info.get("cache") or {}
    recorded = cache.get("state") or {}
    trials = read_trials(search_dir / TRIALS_FILE)
    best = info.get("best") or {}
    stamp_file = search_dir / "search.json" if info else search_dir / TRIALS_FILE
    cv = int(info.get("cv") or 0)
    ml = info.get("task") == MULTILABEL
    return {
        "id": search_dir.name,
        "kind": "search",
        "head": best.get("head") or "-",
        "head_kind": None,
        "layer": best.get("layer"),
        "transforms": best.get("transforms") or "-",
        "params": json.loads(best["params"]) if isinstance(best.get("params"), str) else {},
        "val_accuracy": None if ml else best.get("score"),
        "test_accuracy": None,
        "metric": info.get("metric") or (f"{cv}-fold CV accuracy" if cv else "val accuracy"),
        "strategy": info.get("strategy"),
        "n_trials": len(trials),
        "seconds": info.get("seconds"),
        "epochs": None,
        "created": _stamp(stamp_file.stat().st_mtime) if stamp_file.exists() else "-",
        "source": None,
        "fingerprint": cache.get("fingerprint"),
        "cache": Path(str(cache["path"])).name if cache.get("path") else None,
        "val_n": (recorded.get("val") or {}).get("n"),
        "test_n": None,
        "state": run_status(recorded, {}, current, ("train", "val") if cv else ("val",)),
        "path": str(search_dir),
        "readable": bool(info),
        **(_map_keys({"macro_map": best.get("score")}, {}) if ml else {}),
    }


def search_trials(search_dir: Path) -> list[dict[str, Any]]:
    """Every journaled trial of a search, one row each (val or CV score; a search never touches test)."""
    info = _read_json(search_dir / "search.json") or {}
    cv = int(info.get("cv") or 0)
    rows = []
    for key, t in read_trials(search_dir / TRIALS_FILE).items():
        rows.append(
            {
                "id": f"{search_dir.name}/{key[:8]}",
                "kind": "trial",
                "head": t.get("head") or "?",
                "layer": t.get("layer"),
                "transforms": "+".join(t.get("transforms") or []) or "none",
                "params": t.get("params") or {},
                "val_accuracy": t.get("score"),
                "test_accuracy": None,
                "val_macro_f1": t.get("macro_f1"),
                "metric": info.get("metric") or (f"{cv}-fold CV accuracy" if cv else "val accuracy"),
                "resource": t.get("resource"),
                "status": t.get("status"),
                "error": t.get("error", ""),
                "seconds": t.get("seconds"),
                "created": _stamp(t["finished"]) if isinstance(t.get("finished"), (int, float)) else "-",
                "path": str(search_dir),
            }
        )
    return sorted(rows, key=lambda r: (r["status"] != "ok", -(r["resource"] or 0), -(r["val_accuracy"] or 0)))


def finished_runs(
    root: str | Path, cache: Path | None = None, finetuned: bool = True, fingerprint: str | None = None
) -> list[Path]:
    """Finished runs under ``root`` (stage 2, and ``finetune/*`` when ``finetuned``), newest first;
    only those trained on ``cache`` when it is given (:func:`run_of_cache`; ``fingerprint``: the cache's)."""
    root = Path(root)
    found = [p.parent for p in root.glob(f"*/{MANIFEST}")]
    if finetuned:
        found += [p.parent for p in root.glob(f"{FINETUNED}/*/{MANIFEST}")]
    if cache is not None:
        found = [p for p in found if run_of_cache(read_metrics(p, missing_ok=True).cache, cache, fingerprint)]
    return sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime_ns, reverse=True)


def run_folders(root: str | Path) -> list[Path]:
    """Finished train and fine-tuned runs (a manifest each) and search folders under a runs folder."""
    root = Path(root)
    found = finished_runs(root)
    found += [p for p in root.glob(f"{SEARCH_PREFIX}*") if p.is_dir() and (p / TRIALS_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_run(name: str | Path, roots: Sequence[Path]) -> Path:
    """A run, fine-tuned run or search: its folder, its id under one of ``roots`` (or ``<root>/finetune``),
    or a unique prefix of its id; anything else is one line naming the candidates or where it looked."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    roots = list(dict.fromkeys(Path(r).resolve() for r in roots))
    for root in roots:
        for cand in (root / str(name), root / FINETUNED / str(name)):
            if cand.is_dir():
                return cand
    matches = list(dict.fromkeys(p for r in roots for p in run_folders(r) if p.name.startswith(str(name))))
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(p.name for p in matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise FeatcacheError(f"run {str(name)!r} is ambiguous: {len(matches)} runs start with it ({shown})")
    where = ", ".join(str(r) for r in roots)
    raise FeatcacheError(f"run not found: {name} (in {where}; `featcache runs ls` lists them)")


def list_runs(
    root: str | Path,
    fingerprint: str | None = None,
    *,
    cache: str | Path | None = None,
    state: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per finished run, fine-tuned run and search under ``root``, oldest first. A runs folder may
    serve several caches: with ``cache`` (its path), only the runs made from it (:func:`run_of_cache`),
    else with ``fingerprint`` only those of that fingerprint. ``state``: that cache's state now
    (:func:`pipeline.cache.state.cache_state`), to mark each row current or stale (``state``)."""
    rows = [
        search_row(p, state) if p.name.startswith(SEARCH_PREFIX) else run_row(p, state)
        for p in run_folders(root)
    ]
    if cache is not None:
        rows = [
            r
            for r in rows
            if run_of_cache({"path": r["cache"], "fingerprint": r["fingerprint"]}, cache, fingerprint)
        ]
    elif fingerprint:
        rows = [r for r in rows if r["fingerprint"] in (None, fingerprint)]
    return sorted(rows, key=lambda r: (r["created"], r["id"]))


def best_run(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The train or fine-tuned run with the best val accuracy (test is never used to choose); newest on ties.
    Stale runs (scored on an older state of the cache) are never chosen: their val set was another."""
    runs = [r for r in rows if r["kind"] in ("train", "finetune") and ranked(r)]
    cands = [r for r in runs if r.get("val_accuracy") is not None] or runs
    if not cands:
        return None
    return max(cands, key=lambda r: (r.get("val_accuracy") or 0.0, r["created"], r["id"]))


def describe_run(path: Path, current: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything ``runs show`` prints: the row, plus the metrics and manifest (runs) or the trials (searches);
    ``current``: the state of the cache the run was made from, now (stale or not)."""
    if path.name.startswith(SEARCH_PREFIX):
        return {
            **search_row(path, current),
            "search": _read_json(path / "search.json"),
            "trials": search_trials(path),
        }
    manifest = _read_json(path / MANIFEST) or {}
    return {
        **run_row(path, current),
        "now": {s: v["n"] for s, v in (current or {}).items()},  # the cache's split sizes today
        "metrics": _read_json(path / METRICS),  # the file as it is
        "files": sorted(manifest.get("files", {})),
        "model_files": manifest.get("model_files", []),
    }
