"""Search on a tiny val split and seeing the mistakes, as a user runs them: real photo crops extracted by
the CLI, then `search` whose top trials tie at val accuracy 1.0 (the tie goes to the lowest val log loss),
`predict` without --model (the newest run), `misclassified.csv` with its val rows, and the report's
audit section (suspected label errors with thumbnails, near-duplicates leaking across splits)."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_photo_folder
from PIL import Image

SPACE = """
layers = []
transforms = [["standardize"]]

[[heads]]                 # listed first: the old rule (ties keep the space's order) crowned C=0.001
name = "logistic"
params = { C = [0.001, 0.1, 10.0] }

[[heads]]                 # a margin head: no probabilities, no log loss
name = "ridge"
params = { alpha = [1.0, 1000.0] }
"""


def _extract(root: Path, data: Path) -> list[str]:
    cache_dir = root / "cache"
    sel = ["--data", str(data), "--cache-dir", str(cache_dir), "--image-size", "64"]
    r = run_cli("extract", *sel, "--quiet", "--batch-size", "8",
                "--set", "data.val_fraction=0.3", "--set", "data.test_fraction=0.2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return sel


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """12 crops a class (9 of them in val), extracted by `featcache extract`."""
    root = tmp_path_factory.mktemp("mistakes")
    write_photo_folder(data := root / "photos", per_class=12)
    (space := root / "space.toml").write_text(SPACE)
    return {"root": root, "data": data, "sel": _extract(root, data), "space": space}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """The same kind of folder with one china crop filed under flower (a label error) and re-encoded
    copies of one crop (near-duplicates: their content hashes put some in other splits)."""
    root = tmp_path_factory.mktemp("planted")
    write_photo_folder(data := root / "photos", per_class=12)
    shutil.copy(data / "china" / "china_001.jpg", data / "flower" / "planted_china.jpg")
    (data / "china" / "china_001.jpg").unlink()
    original = Image.open(data / "china" / "china_002.jpg").convert("RGB")
    for q in (60, 70, 80, 90):
        original.save(data / "china" / f"copy_q{q}.jpg", quality=q)
    return {"root": root, "data": data, "sel": _extract(root, data), "planted": "flower/planted_china.jpg"}


def _board(folder: Path) -> list[dict[str, str]]:
    with open(folder / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_top_trials_tied_on_a_tiny_val_split_go_to_the_lowest_log_loss(photos):
    r = run_cli("search", *photos["sel"], "--space", str(photos["space"]), "--strategy", "grid",
                "--n-jobs", "1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip().splitlines()[-1].removeprefix("search folder: "))
    rows = _board(folder)
    assert "log_loss" in rows[0]
    top = float(rows[0]["score"])
    tied = [x for x in rows if float(x["score"]) == top]
    assert len(tied) >= 3, rows  # a val split this small cannot separate them
    known = [float(x["log_loss"]) for x in tied if x["log_loss"]]
    assert float(rows[0]["log_loss"]) == min(known)
    assert json.loads(rows[0]["params"]) != {"C": 0.001}  # the old rule's winner (first in the space)
    # margin heads have no log loss (empty) and rank after every tied trial that has one
    margins = [i for i, x in enumerate(tied) if x["head"] == "ridge"]
    assert margins and all(not tied[i]["log_loss"] for i in margins)
    assert min(margins) == len(known)
    # no log loss to tell the ridge trials apart: the simpler model first (the larger alpha)
    assert [json.loads(tied[i]["params"])["alpha"] for i in margins] == [1000.0, 1.0]
    assert float(rows[0]["score"]) == 1.0
    assert "trials tie at the top" in r.stdout and "ranked by val log loss" in r.stdout
    assert "classes too small for their split" in r.stdout  # train's note on small val splits
    # the refit is the run: best.toml is not the next step
    summary = json.loads((folder / "search.json").read_text())
    assert summary["best"]["key"] == rows[0]["key"] and summary["refit"]["run"]
    assert "the refit run below is it" in r.stdout


def test_the_simpler_model_order():
    """The last tie-break before the space's order: linear, then k-NN, then networks; fewer inputs first."""
    from pipeline.heads.registry import model_complexity

    order = [
        ("ridge", {"alpha": 1000.0}, ["l2", "pca:64"]),
        ("ridge", {"alpha": 1000.0}, ["standardize"]),
        ("logistic", {"C": 0.01}, ["standardize"]),
        ("logistic", {"C": 10.0}, ["standardize"]),
        ("knn", {"n_neighbors": 20}, ["l2"]),
        ("knn", {"n_neighbors": 1}, ["l2"]),
        ("mlp", {"hidden": [128]}, ["standardize"]),
        ("mlp", {"hidden_layer_sizes": [512]}, ["standardize"]),
        ("hgb", {}, []),
    ]
    keys = [model_complexity(*c) for c in order]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_predict_without_model_takes_the_newest_run_and_says_which(photos):
    runs = sorted(p for p in (photos["root"] / "cache" / "runs").iterdir() if (p / "manifest.json").is_file())
    assert runs, "the search refit a run"
    image = next((photos["data"] / "china").glob("*.png"))
    r = run_cli("predict", *photos["sel"], str(image))
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("model: ")]
    newest = max(runs, key=lambda p: (p / "manifest.json").stat().st_mtime)
    assert len(said) == 1 and newest.name in said[0], r.stderr
    assert "china" in r.stdout
    r = run_cli("predict", "--model", newest.name, *photos["sel"], str(image))  # --model still works
    assert r.returncode == 0 and not any(x.startswith("model: ") for x in r.stderr.splitlines()), r.stderr


def test_misclassified_csv_lists_val_and_test_mistakes_with_their_split(photos):
    r = run_cli("train", *photos["sel"], "--head", "logistic", "--param", "C=0.00001", "--quiet")
    assert r.returncode == 0, r.stderr
    run = Path(r.stdout.strip().splitlines()[-1].removeprefix("run: "))
    m = json.loads((run / "metrics.json").read_text())
    with open(run / "misclassified.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["key", "true", "predicted", "probability", "split"]
    for split in ("val", "test"):
        wrong = m[split]["n"] - int(np.trace(np.asarray(m[split]["confusion_matrix"])))
        assert sum(x["split"] == split for x in rows) == wrong == m[split]["misclassified"]
    assert any(x["split"] == "val" for x in rows)
    splits = [x["split"] for x in rows]
    assert splits == sorted(splits, key=["test", "val"].index)  # test first, then val


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.audit_text, self._in_audit = [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self._in_audit = a.get("id") == "audit"
        if tag == "img":
            self.imgs.append(a)

    def handle_data(self, data):
        if self._in_audit:
            self.audit_text.append(data)


def _report(photos, out: Path) -> _Page:
    r = run_cli("report", *photos["sel"], "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    page = _Page()
    page.feed(out.read_text())
    return page


def test_the_report_shows_the_audit_or_says_there_is_none(planted):
    photos = planted
    r = run_cli("train", *photos["sel"], "--quiet")  # a run to report on
    assert r.returncode == 0, r.stderr
    page = _report(photos, photos["root"] / "before.html")
    assert "no audit of this cache" in "".join(page.audit_text)
    r = run_cli("audit", *photos["sel"], "--quiet")
    assert r.returncode == 0, r.stderr
    (issues,) = photos["root"].glob("cache/*.label_issues.csv")
    (pairs,) = photos["root"].glob("cache/*.near_duplicates.csv")
    with open(issues, newline="") as f:
        suspects = list(csv.DictReader(f))
    with open(pairs, newline="") as f:
        leaks = [p for p in csv.DictReader(f) if p["cross_split"] == "1"]
    assert photos["planted"] in [s["key"] for s in suspects]
    assert leaks, "the re-encoded copies straddle splits"
    page = _report(photos, photos["root"] / "after.html")
    text = "".join(page.audit_text)
    assert f"{len(suspects)} likely label errors" in text and f"{len(leaks)} across splits" in text
    thumbs = [i["alt"] for i in page.imgs if i.get("class") == "thumb audit"]
    shown = [s["key"] for s in suspects[:12]]
    assert thumbs[: len(shown)] == shown  # most suspicious first, each with its thumbnail
    pairs_shown = [k for p in leaks[:6] for k in (p["a"], p["b"])]
    assert thumbs[len(shown) :] == pairs_shown
    assert "Leaking near-duplicates" in text
