"""See the results: the HTML report (rendered in a real headless Chromium), ``runs ls``/``runs show``,
model files saved with skops (old joblib runs still load), fine-tuning's TensorBoard logs.

The runs are real: the shared digits cache, two trains (logistic, keras_linear) and a grid search,
written to a runs folder of this module's own.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIXTURE = Path(__file__).parent / "fixtures" / "v0.1"
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian `chromium` is not installed (make install)"
)


class Page(HTMLParser):
    """What a test needs from the report: pictures, external references, and the leaderboard's cells."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.refs: list[str] = []  # every src/href
        self.tags: list[str] = []
        self.board: list[list[dict[str, str | None]]] = []
        self.board_head: list[dict[str, str | None]] = []
        self._in_board = self._in_body = False
        self._cell: dict[str, str | None] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "img":
            self.imgs.append(a)
        if tag == "table" and a.get("id") == "leaderboard":
            self._in_board = True
        if self._in_board and tag == "tbody":
            self._in_body = True
        if self._in_board and tag == "tr" and self._in_body:
            self.board.append([])
        if self._in_board and tag in ("td", "th"):
            self._cell = {**a, "text": ""}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if self._in_board and tag in ("td", "th") and self._cell is not None:
            (self.board[-1] if self._in_body else self.board_head).append(self._cell)
            self._cell = None
        if tag == "table" and self._in_board:
            self._in_board = self._in_body = False


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        *args, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(digits_cache, tmp_path_factory) -> dict:
    """Two trains and a two-trial grid search on the digits cache, then the report (the best run and the
    keras_linear run in detail, so learning curves are drawn)."""
    from pipeline.stages.report import report
    from pipeline.stages.search import search
    from pipeline.stages.train import train

    root = tmp_path_factory.mktemp("results")
    space = root / "space.toml"
    space.write_text('[[heads]]\nname = "ridge"\nparams = { alpha = [0.1, 10.0] }\n')
    ov = {
        "train.cache": str(digits_cache),
        "train.runs_dir": str(root / "runs"),
        "extract.progress": "false",
        "search.space": str(space),
        "search.n_jobs": "1",
    }
    logistic = train(load_config(None, ov)).run_dir
    cfg = load_config(None, {**ov, "train.head": "keras_linear"})
    cfg.train.params = {"epochs": 4}
    keras_run = train(cfg).run_dir
    searched = search(load_config(None, {**ov, "search.refit": "false"}))  # two runs and two trials, no refit
    out = root / "report.html"
    rep = report(
        load_config(None, ov), out=out, run=keras_run.name, thumbnails=8, map_rows=600, tsne_rows=200
    )
    return {
        "root": root, "ov": ov, "cache": digits_cache, "runs": [logistic, keras_run], "search": searched,
        "report": rep, "html": out.read_text(encoding="utf-8"),
    }  # fmt: skip


def test_report_names_every_run_embeds_pictures_and_loads_nothing(results):
    page = Page(results["html"])
    ids = [row[0]["text"] for row in page.board]
    trial_ids = [f"{results['search'].dir.name}/{r['key'][:8]}" for r in results["search"].leaderboard]
    assert len(trial_ids) == 2
    assert sorted(ids) == sorted([p.name for p in results["runs"]] + trial_ids)
    kinds = {row[0]["text"]: row[1]["text"] for row in page.board}
    assert [kinds[p.name] for p in results["runs"]] == ["train", "train"] and kinds[trial_ids[0]] == "trial"

    # every picture is an inline PNG that decodes; nothing is fetched from anywhere
    assert page.refs and all(r.startswith("data:image/png;base64,") for r in page.refs)
    assert not {"link", "iframe", "object", "embed"} & set(page.tags)
    text = results["html"].lower()
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    for img in page.imgs:
        im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert im.format == "PNG" and min(im.size) >= 16
    alts = [i["alt"] for i in page.imgs]
    n = len(results["report"].detailed)  # the keras_linear run (--run) and the best on val, unless the same
    assert alts.count("confusion, val") == n and alts.count("confusion, test") == n
    assert "learning curves" in alts and "feature map" in alts
    thumbs = [i for i in page.imgs if i.get("class") == "thumb"]
    assert 1 <= len(thumbs) == results["report"].thumbnails <= 8 * n
    wrong = (results["runs"][1] / "misclassified.csv").read_text().splitlines()[1:]
    assert thumbs[0]["alt"] == wrong[0].split(",")[0]  # the most confident mistake first

    # the cache section: per-class rows per split, and the detailed sections name the class names
    rep = results["report"]
    assert rep.best in {p.name for p in results["runs"]} and set(rep.detailed) >= {results["runs"][1].name}
    assert "Rows per split and class" in results["html"] and "Skipped files" in results["html"]
    assert rep.map_rows == (600, 200)


@needs_chromium
def test_report_renders_in_headless_chromium_and_sorts_on_click(results, tmp_path):
    url = (results["root"] / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    r = chromium(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.is_file(), r.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 2000)
    a = np.asarray(im).astype(np.int16)
    assert a.std() > 20, "a blank page"
    background = (np.abs(a - a[5, 5]).sum(axis=2) > 30).mean()
    assert background > 0.05, "almost nothing drawn"
    saturated = (a.max(axis=2) - a.min(axis=2) > 40).sum()
    assert saturated > 2000, "no colour: plots did not render"
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 200

    # a click on "val acc" (through the page's test hook) sorts the leaderboard, best first
    dom = chromium(url + "#sort=val_accuracy", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0 and "leaderboard" in dom.stdout, dom.stderr[-2000:]
    page = Page(dom.stdout)
    col = [c.get("data-key") for c in page.board_head].index("val_accuracy")
    assert page.board_head[col].get("data-dir") == "desc"
    values = [float(row[col]["data-v"]) for row in page.board if row[col]["data-v"]]
    assert len(values) == 4 and values == sorted(values, reverse=True)


def test_runs_ls_and_show_from_the_cli(results):
    sel = ["--cache", str(results["cache"]), "--set", f"train.runs_dir={results['ov']['train.runs_dir']}"]
    logistic, keras_run = results["runs"]
    search_id = results["search"].dir.name

    r = run_cli("runs", "ls", *sel, "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {logistic.name, keras_run.name, search_id}
    assert rows[keras_run.name]["kind"] == "train" and rows[search_id]["kind"] == "search"
    m = json.loads((logistic / "metrics.json").read_text())
    assert rows[logistic.name]["test_accuracy"] == m["test"]["accuracy"]
    assert (
        rows[search_id]["n_trials"] == 2
        and rows[search_id]["val_accuracy"] == results["search"].best["score"]
    )

    r = run_cli("runs", "ls", *sel)
    lines = r.stdout.strip().splitlines()
    assert (
        r.returncode == 0
        and len(lines) == 4
        and lines[0].split()[:5] == ["id", "kind", "head", "val_acc", "test_acc"]
    )
    line = next(x for x in lines if x.startswith(logistic.name))
    assert line.split()[1:5] == [
        "train",
        "logistic",
        f"{m['val']['accuracy']:.4f}",
        f"{m['test']['accuracy']:.4f}",
    ]

    r = run_cli("runs", "show", keras_run.name[:-2], *sel)  # a unique prefix is enough
    assert r.returncode == 0, r.stderr
    assert keras_run.name in r.stdout and "keras_linear" in r.stdout and "class (test)" in r.stdout
    assert "transforms.skops" in r.stdout and "joblib" not in r.stdout

    r = run_cli("runs", "show", "2026-no-such-run", *sel)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "run not found" in r.stderr


# ---------------------------------------------------------------------------------- skops model files


def _fit(head: str, params: dict, transforms: list[str]):
    from sklearn.datasets import load_digits

    from pipeline.cache.reader import Data
    from pipeline.heads.fitting import fit_model

    d = load_digits()
    X, y = d.data.astype(np.float32)[:400], d.target[:400]
    data = Data("digits", "x", y, X.shape[1], np.arange(len(y)), X)
    return fit_model(data, np.arange(300), np.arange(300, 400), head, params, transforms).model, X


@pytest.mark.parametrize(
    ("head", "params", "transforms"),
    [
        ("mlp", {"max_iter": 30}, ["standardize"]),
        ("hgb", {"max_iter": 5}, []),
        ("logistic", {}, ["pca:8", "l2"]),
    ],
)
def test_sklearn_heads_round_trip_through_skops_not_pickle(tmp_path, head, params, transforms):
    """MLP (its Adam state) and HGB (its tree predictors) hold types skops does not trust by default."""
    from threadpoolctl import threadpool_limits

    from pipeline.heads.persist import load_model, save_model
    from pipeline.utils.runs import write_manifest

    with threadpool_limits(limits=1):  # OpenMP threads spin-wait on a busy machine (hgb: 200 s instead of 2)
        model, X = _fit(head, params, transforms)
    kind, files = save_model(tmp_path, model)
    write_manifest(tmp_path, kind, files)
    assert files == ["model.skops"] and not list(tmp_path.glob("*.joblib"))
    assert (tmp_path / "model.skops").read_bytes()[:2] == b"PK"  # a zip of JSON and arrays, not a pickle
    np.testing.assert_array_equal(load_model(tmp_path).predict_proba(X), model.predict_proba(X))


def test_a_model_file_with_untrusted_types_is_refused_even_with_a_valid_manifest(tmp_path):
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from pipeline.heads.persist import load_model
    from pipeline.utils.runs import write_manifest

    sio.dump(Pipeline([("f", FunctionTransformer(os.getcwd))]), tmp_path / "model.skops")  # a crafted file
    (tmp_path / "metrics.json").write_text("{}")
    write_manifest(tmp_path, "sklearn", ["model.skops"])
    with pytest.raises(FeatcacheError, match=r"refusing to load types .*getcwd"):
        load_model(tmp_path)


def test_old_joblib_runs_load_after_the_manifest_check_with_one_note(tmp_path, capsys):
    from pipeline.heads.persist import load_run

    shutil.copytree(FIXTURE / "cache" / "runs", tmp_path / "runs")
    for run_dir in sorted((tmp_path / "runs").iterdir()):
        load_run(run_dir, trust_pickle=True)
        load_run(run_dir, trust_pickle=True)  # the note is said once
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"note: {run_dir.name} was saved by featcache 0.1")
    tampered = tmp_path / "runs" / next(p.name for p in (tmp_path / "runs").iterdir() if "logistic" in p.name)
    data = bytearray((tampered / "model.joblib").read_bytes())
    data[-3] ^= 0x01
    (tampered / "model.joblib").write_bytes(bytes(data))
    with pytest.raises(FeatcacheError, match="sha256 differs"):  # checked before anything is unpickled
        load_run(tampered, trust_pickle=True)


# ---------------------------------------------------------------------------------- fine-tuning


def _events(folder: Path) -> dict[str, dict[int, float]]:
    """tag → {step: value} of every event file under ``folder`` (TensorFlow's own reader)."""
    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                out.setdefault(v.tag, {})[int(event.step)] = float(tf.make_ndarray(v.tensor))
    return out


@pytest.mark.slow
def test_finetune_tensorboard_logs_and_the_report_of_a_finetuned_run(tmp_path_factory, tmp_path):
    """``featcache finetune --tensorboard`` writes Keras' TensorBoard logs (one point per epoch, equal to the
    run's history) outside the manifest; ``featcache report --run`` then details the fine-tuned run."""
    from test_finetune import finetune_overrides, stage3_setup

    from pipeline.stages.finetune import finetune_dir
    from pipeline.utils.runs import verify_run

    setup = stage3_setup(tmp_path_factory.getbasetemp())
    ov = finetune_overrides(
        setup, **{"finetune.unfreeze": "none", "finetune.augment": "none", "finetune.epochs": "2"}
    )
    sets = [a for k, v in ov.items() if k != "extract.progress" for a in ("--set", f"{k}={v}")]
    r = run_cli("finetune", "--quiet", "--tensorboard", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = finetune_dir(setup["run"], load_config(None, ov))
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    train_ev, val_ev = (
        _events(run_dir / "tensorboard" / "train"),
        _events(run_dir / "tensorboard" / "validation"),
    )
    assert sorted(train_ev["epoch_loss"]) == [0, 1] and sorted(val_ev["epoch_loss"]) == [0, 1]
    np.testing.assert_allclose([train_ev["epoch_loss"][e] for e in (0, 1)], history["loss"], rtol=1e-5)
    np.testing.assert_allclose([val_ev["epoch_loss"][e] for e in (0, 1)], history["val_loss"], rtol=1e-5)
    manifest = verify_run(run_dir)
    assert not any("tensorboard" in name for name in manifest["files"])

    out = tmp_path / "ft.html"
    sel = [a for k, v in setup["overrides"].items() if k != "extract.progress" for a in ("--set", f"{k}={v}")]
    r = run_cli("report", "--quiet", "--run", run_dir.name, "--out", str(out), *sel)
    assert r.returncode == 0, r.stderr[-3000:]
    page = Page(out.read_text(encoding="utf-8"))
    kinds = {row[0]["text"]: row[1]["text"] for row in page.board}
    assert kinds[run_dir.name] == "finetune" and kinds[setup["run"].name] == "train"
    assert f"Fine-tuned run {run_dir.name}" in out.read_text() and "learning curves" in [
        i["alt"] for i in page.imgs
    ]
