"""audit and report on a multi-label cache, on real mosaics of Fashion-MNIST images (tests/mosaics.py):
per-label errors planted in the labels CSV are found, and the report shows per-class AP, thresholds and
precision-recall curves; a ``featcache compare`` folder beside a cache adds its leaderboard to the report."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.utils.config import load_config
from tests.mosaics import CLASSES, HAVE_FASHION, write_mosaics
from tests.mosaics import mosaic_config as _cfg

pytestmark = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset) not installed")

N = 300
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NAMES = sorted(CLASSES.values())


def _plant(root: Path, truth: list[set[str]], rate: float = 0.05, seed: int = 1) -> set[tuple[str, str]]:
    """On ``rate`` of the rows of ``labels.csv``, drop one present label or add one absent label; returns
    the planted (key, class) cells."""
    rng = np.random.default_rng(seed)
    lines = (root / "labels.csv").read_text().splitlines()
    planted = set()
    for i in rng.choice(len(truth), int(round(rate * len(truth))), replace=False):
        labels, key = set(truth[i]), f"m{i:04d}.png"
        if labels and rng.random() < 0.5:
            c = str(rng.choice(sorted(labels)))
            labels.discard(c)
        else:
            c = str(rng.choice(sorted(set(NAMES) - labels)))
            labels.add(c)
        planted.add((key, c))
        lines[i + 1] = f"{key},{';'.join(sorted(labels))}"
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return planted


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """300 mosaics with 15 planted label errors, extracted once at 32 px."""
    from pipeline.stages.extract import extract

    tmp = tmp_path_factory.mktemp("mlaudit")
    truth = write_mosaics(tmp / "data", N)
    planted = _plant(tmp / "data", truth)
    result = extract(_cfg(tmp))
    return tmp, truth, planted, result.path


def test_audit_flags_planted_per_label_errors(noisy):
    from pipeline.stages.audit import audit

    tmp, truth, planted, cache = noisy
    res = audit(_cfg(tmp))
    assert res.multilabel and res.label_issues
    flagged = {(it["key"], s["class"]) for it in res.label_issues for s in it["suspect"]}
    hits = flagged & planted
    base_rate = len(planted) / (N * len(NAMES))  # a random cell is a planted error this often
    precision, recall = len(hits) / len(flagged), len(hits) / len(planted)
    # measured (seeds 0-2): precision 0.05-0.06 (4-5x the 0.0125 base rate), recall 0.47-0.67
    assert precision > 2.5 * base_rate and recall >= 0.3, (precision, recall, len(flagged))
    for it in res.label_issues:  # each suspect says which way it is wrong, consistently with the labels
        for s in it["suspect"]:
            assert s["issue"] == ("extra" if s["class"] in it["given"] else "missing")
            assert s["score"] == pytest.approx(
                1 - s["probability"] if s["issue"] == "extra" else s["probability"]
            )
        assert it["score"] == max(s["score"] for s in it["suspect"])
    scores = [it["score"] for it in res.label_issues]
    assert scores == sorted(scores, reverse=True)
    for key, c in hits:  # a planted addition is an extra label, a planted removal a missing one
        kind = next(
            s["issue"]
            for it in res.label_issues
            if it["key"] == key
            for s in it["suspect"]
            if s["class"] == c
        )
        idx = int(key[1:5])
        assert kind == ("missing" if c in truth[idx] else "extra")

    out = res.to_json()["label_issues"][0]
    assert set(out) == {"key", "given", "suspect", "score"}
    assert "suspect labels" in res.table(5) and res.near_duplicates is not None
    with open(res.files["label issues"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(flagged) and set(rows[0]) >= {"key", "class", "issue", "probability", "given"}


def test_flagged_cells_match_cleanlab(noisy):
    """The same out-of-fold probabilities through cleanlab's per-class multi-label filter (when installed)."""
    filt = pytest.importorskip("cleanlab.multilabel_classification.filter")
    from pipeline.cache.store import FeatureCache
    from pipeline.heads.label_noise import find_multilabel_issues, out_of_fold_multilabel_proba

    _, _, _, cache = noisy
    with FeatureCache(cache) as c:
        X, Y, split = c.features(c.layer_name(None)), c.labels.copy(), c.split
    P = out_of_fold_multilabel_proba(X, Y, split != 2)
    for filter_by in ("low_self_confidence", "prune_by_noise_rate"):
        ours = np.zeros(Y.shape, bool)
        found = find_multilabel_issues(Y, P, filter_by)
        ours[found.rows, found.classes] = True
        theirs = np.asarray(
            filt.find_multilabel_issues_per_class(
                [list(np.flatnonzero(r)) for r in Y], P, filter_by=filter_by
            )
        )
        jaccard = (ours & theirs).sum() / max(1, (ours | theirs).sum())
        assert jaccard >= 0.95, (filter_by, ours.sum(), theirs.sum(), jaccard)


class Tables(HTMLParser):
    """Each table of the page by id: its header cells and rows of cell texts; the pictures by alt text."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, dict[str, list]] = {}
        self.imgs: dict[str, str] = {}
        self.headings: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._h = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = {"head": [], "rows": []}
        elif tag == "tr" and self._table:
            self.tables[self._table]["rows"].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.imgs[a.get("alt", "")] = a["src"]
        elif tag in ("h2", "h3"):
            self._h, self.headings = True, [*self.headings, ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._h:
            self.headings[-1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            t = self.tables[self._table]
            t["rows"][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag in ("h2", "h3"):
            self._h = False


def _png(src: str):
    from PIL import Image

    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


@pytest.fixture(scope="module")
def ml_report(noisy):
    from pipeline.stages.report import report
    from pipeline.stages.train import train

    tmp, _, _, _ = noisy
    run = train(_cfg(tmp), head="logistic", train__params={"C": 0.1})
    out = tmp / "ml-report.html"
    return run, out, report(_cfg(tmp), out=out, thumbnails=6, map_rows=200, tsne_rows=0)


def test_report_on_a_multilabel_run(ml_report):
    from pipeline.utils.runs import read_metrics

    run, out, rep = ml_report
    m = read_metrics(run.run_dir)
    page = Tables(out.read_text(encoding="utf-8"))
    assert rep.best == run.run_dir.name and rep.detailed == [run.run_dir.name]

    per_class = page.tables["per-class"]
    header, rows = per_class["rows"][0], per_class["rows"][1:]
    assert header[:3] == ["class", "test AP", "threshold"] and "test F1" in header and "test n" in header
    assert sorted(r[0] for r in rows) == NAMES  # every class, once
    for r in rows:
        c = m["test"]["per_class"][r[0]]
        assert float(r[1]) == pytest.approx(c["ap"], abs=5e-4)
        assert float(r[2]) == pytest.approx(m["thresholds"][r[0]], abs=5e-4)
        assert int(r[header.index("test n")]) == c["support"]

    board = page.tables["leaderboard"]
    assert "val macro mAP" in board["rows"][0] and any(run.run_dir.name in r for r in board["rows"])
    pr = _png(page.imgs["precision-recall curves"])
    assert pr.format == "PNG" and min(pr.size) > 200
    assert "feature map" in page.imgs and "Confusion matrices" not in page.headings
    assert any("most wrong labels" in h for h in page.headings)
    text = out.read_text(encoding="utf-8")
    assert f"{m['test']['macro_map']:.4f}" in text and "label-frequency baseline" in text
    assert "(no label)" in text  # the cache's table counts the mosaics without a label


@pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed (make install)")
def test_multilabel_report_sorts_per_class_in_headless_chromium(ml_report, tmp_path):
    from tests.test_report import chromium

    _, out, _ = ml_report
    dom = chromium(out.resolve().as_uri() + "#sort=test_AP", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0 and "per-class" in dom.stdout, dom.stderr[-2000:]
    rows = Tables(dom.stdout).tables["per-class"]["rows"][1:]
    ap = [float(r[1]) for r in rows]
    assert len(ap) == len(NAMES) and ap == sorted(ap, reverse=True)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A tiny real compare (two candidates on 120 digits) beside a cache, as ``featcache compare`` leaves it."""
    from sklearn.datasets import load_digits

    import pipeline

    root = tmp_path_factory.mktemp("mlcompare")
    d = load_digits()
    np.savez(root / "digits.npz", images=np.clip(d.images * 16, 0, 255).astype(np.uint8), labels=d.target)
    cands = root / "candidates.toml"
    cands.write_text(
        '[[candidate]]\nname = "efficientnet_lite0"\nimage_size = 32\n\n'
        '[[candidate]]\nlabel = "mobilenet-random"\nname = "mobilenet_v2"\nweights = "none"\nimage_size = 32\n'
    )
    result = pipeline.compare(
        data=str(root / "digits.npz"),
        cache_dir=str(root / "cache"),
        limit=120,
        candidates=str(cands),
        extract__progress=False,
    )
    return root, result


def test_report_shows_the_newest_compare_beside_the_cache(compared):
    from pipeline.stages.report import report
    from pipeline.utils.errors import FeatcacheError

    root, result = compared
    best = result.rows[0]
    cfg = load_config(None, {"train.cache": best["cache"], "extract.progress": False})
    out = root / "report.html"
    report(cfg, out=out, thumbnails=0, map_rows=50, tsne_rows=0)
    page = Tables(out.read_text(encoding="utf-8"))
    table = page.tables["compare"]
    assert table["rows"][0][:3] == ["#", "candidate", "layer"]
    rows = table["rows"][1:]
    assert [r[1] for r in rows] == [r["label"] for r in result.rows] and len(rows) == len(result.rows)
    saved = json.loads((result.dir / "leaderboard.json").read_text())["candidates"]
    assert [float(r[5]) for r in rows] == pytest.approx([r["test_accuracy"] for r in saved], abs=5e-5)
    assert _png(page.imgs["accuracy vs cost"]).format == "PNG"
    assert "Backbone comparison" in page.headings

    again = root / "again.html"  # named explicitly, the folder or its leaderboard.json
    report(
        cfg, out=again, thumbnails=0, map_rows=50, tsne_rows=0, compare=str(result.dir / "leaderboard.json")
    )
    assert "accuracy vs cost" in Tables(again.read_text(encoding="utf-8")).imgs
    with pytest.raises(FeatcacheError, match="--compare .*: no leaderboard.json"):
        report(cfg, out=again, compare=str(root))


def test_multilabel_report_shows_search_trials_failures_and_a_keras_head(noisy):
    """Search trials on a multi-label cache show their val macro mAP (a failed one says so in that column);
    a Keras head's section calls it a sigmoid per class (not one-vs-rest) and draws its curves."""
    from pipeline.stages.report import report
    from pipeline.stages.search import search
    from pipeline.stages.train import train
    from pipeline.utils.runs import read_metrics

    tmp, _, _, _ = noisy
    runs = {"train.runs_dir": str(tmp / "runs-search")}
    space = tmp / "space.toml"
    space.write_text('[[heads]]\nname = "logistic"\nparams = { C = [0.01, 0.1, -1.0] }\n')
    found = search(
        _cfg(tmp, **runs, **{"search.space": str(space), "search.n_jobs": 1, "search.refit": False})
    )
    keras = train(_cfg(tmp, **runs), head="keras_linear", train__params={"epochs": 3}).run_dir
    out = tmp / "ml-search.html"
    rep = report(_cfg(tmp, **runs), out=out, run=keras.name, thumbnails=0, map_rows=50, tsne_rows=0)

    board = Tables(out.read_text(encoding="utf-8")).tables["leaderboard"]
    head, rows = board["rows"][0], {r[0]: r for r in board["rows"][1:]}
    col = head.index("val macro mAP")
    trials = {f"{found.dir.name}/{t['key'][:8]}": t for t in found.leaderboard}
    assert len(trials) == 3 and set(trials) <= set(rows)
    ok = [t for t in trials.values() if t["status"] == "ok"]
    assert len(ok) == 2 and all(0 < t["score"] <= 1 for t in ok)
    for rid, t in trials.items():
        cell = rows[rid][col]
        assert cell == ("failed" if t["status"] != "ok" else f"{t['score']:.4f}"), (rid, t)
    m = read_metrics(keras)
    assert rows[keras.name][col] == f"{m['val']['macro_map']:.4f}"
    assert rows[keras.name][head.index("test macro mAP")] == f"{m['test']['macro_map']:.4f}"
    assert rows[keras.name][head.index("test micro mAP")] == f"{m['test']['micro_map']:.4f}"
    assert rep.best == keras.name and rep.detailed == [keras.name]

    text = out.read_text(encoding="utf-8")
    assert "keras_linear" in text and "(a sigmoid per class)" in text and "(one-vs-rest)" not in text
    assert "precision-recall curves" in Tables(text).imgs and not rep.notes
    assert "search trials scored by" not in text  # val macro mAP is what the column says


def test_report_shows_a_multilabel_compare_of_this_cache_only(noisy, compared):
    """A multi-label compare beside the cache is shown by mAP; a newer compare of another dataset (the
    digits one, copied beside) is not; a newer broken leaderboard is a note on the page, not an error,
    unless named with --compare."""
    import os

    import pipeline
    from pipeline.stages.report import report
    from pipeline.utils.errors import FeatcacheError

    tmp, _, _, cache = noisy
    cands = tmp / "candidates.toml"
    cands.write_text('[[candidate]]\nname = "efficientnet_lite0"\nimage_size = 32\n')
    result = pipeline.compare(
        data=str(tmp / "data" / "labels.csv"), cache_dir=str(tmp / "cache"), candidates=str(cands),
        extract__progress=False,
    )  # fmt: skip
    assert {Path(r["cache"]).resolve() for r in result.rows} == {Path(cache).resolve()}
    other = tmp / "cache" / "compare-digits"
    shutil.copytree(compared[1].dir, other)
    broken = tmp / "cache" / "compare-broken"
    broken.mkdir()
    (broken / "leaderboard.json").write_text('{"candidates": [', encoding="utf-8")
    newest = (result.dir / "leaderboard.json").stat().st_mtime_ns
    os.utime(other / "leaderboard.json", ns=(newest + 10**9, newest + 10**9))
    os.utime(broken / "leaderboard.json", ns=(newest + 2 * 10**9, newest + 2 * 10**9))

    out = tmp / "ml-compare.html"
    rep = report(_cfg(tmp), out=out, thumbnails=0, map_rows=50, tsne_rows=0)
    text = out.read_text(encoding="utf-8")
    page = Tables(text)
    table = page.tables["compare"]
    head, rows = table["rows"][0], table["rows"][1:]
    assert head[4:7] == ["val mAP", "test mAP", "test micro mAP"] and "val acc" not in head
    saved = json.loads((result.dir / "leaderboard.json").read_text())["candidates"]
    assert [r[1] for r in rows] == [s["label"] for s in saved]
    for r, s in zip(rows, saved, strict=True):
        assert [float(x) for x in r[4:7]] == pytest.approx(
            [s["val_map"], s["test_map"], s["micro_map"]], abs=5e-5
        )
    assert result.dir.name in text and "compare-digits" not in text
    assert "best first by val macro mAP" in text and "by val accuracy" not in text
    assert _png(page.imgs["mAP vs cost"]).format == "PNG"
    assert [n for n in rep.notes if "compare-broken" in n and "unreadable" in n]
    assert "compare-broken" in text  # the note is on the page too

    with pytest.raises(FeatcacheError, match="compare-broken.*unreadable"):
        report(_cfg(tmp), out=out, compare=str(broken))
