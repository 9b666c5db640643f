"""Keras heads and search on a multi-label cache, on real images with known truth: 2×2 mosaics of
Fashion-MNIST images, each labelled with the set of classes it shows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.mosaics import CLASSES, HAVE_FASHION, write_mosaics
from tests.mosaics import mosaic_config as _cfg

pytestmark = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset) not installed")

SPACE = """
[[heads]]
name = "logistic"
params = { C = [0.003, 0.03, 0.3] }

[[heads]]
name = "ridge"
params = { alpha = [10.0, 1000.0] }

[[heads]]
name = "keras_linear"
params = { class_weight = ["balanced"] }

[[heads]]
name = "knn"
"""


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    from pipeline.stages.extract import extract

    tmp = tmp_path_factory.mktemp("mlsearch")
    truth = write_mosaics(tmp / "data", 300)
    result = extract(_cfg(tmp))
    (tmp / "space.toml").write_text(SPACE)
    return tmp, truth, result.path


def test_keras_head_learns_the_label_sets_with_a_threshold_per_class(mosaics):
    import keras

    from pipeline.heads.persist import load_model
    from pipeline.stages.predict import predict
    from pipeline.stages.train import train

    tmp, truth, _ = mosaics
    cfg = _cfg(tmp)
    run = train(cfg, head="keras_mlp", train__params={"class_weight": "balanced"})
    m = run.metrics
    assert m["task"] == "multilabel" and m["head_kind"] == "keras" and m["fit"]["epochs"] >= 1
    assert m["test"]["macro_map"] > m["test"]["map_baseline"] + 0.25, m["test"]
    thresholds = m["thresholds"]
    assert set(thresholds) == set(CLASSES.values()) and len(set(thresholds.values())) > 1  # one per class
    state = json.loads((run.run_dir / "head.json").read_text())
    assert state["task"] == "multilabel" and state["params"]["class_weight"] == "balanced"
    saved = keras.saving.load_model(run.run_dir / "head.keras", safe_mode=True)  # no custom object
    assert saved.layers[-1].get_config()["activation"] == "sigmoid" and saved.output_shape == (None, 4)
    model = load_model(run.run_dir)
    P = model.predict_proba(np.random.default_rng(0).normal(size=(5, m["n_features"])).astype(np.float32))
    assert P.shape == (5, 4) and ((P >= 0) & (P <= 1)).all()
    images = [str(tmp / "data" / f"m{i:04d}.png") for i in range(12)]
    _, results = predict(str(run.run_dir), images, cfg)
    assert all(p >= thresholds[c] for r in results for _, c, p in r.labels)
    assert sum({c for _, c, _ in r.labels} == names for r, names in zip(results, truth, strict=False)) >= 5


def test_search_ranks_by_macro_map_resumes_and_refits(mosaics):
    from pipeline.cache.reader import Data
    from pipeline.cache.store import FeatureCache
    from pipeline.heads.metrics import macro_map
    from pipeline.heads.multilabel import fit_multilabel, label_scores
    from pipeline.stages.predict import predict
    from pipeline.stages.search import search

    tmp, _, cache_path = mosaics
    cfg = _cfg(
        tmp, **{"search.space": str(tmp / "space.toml"), "search.strategy": "grid", "search.n_jobs": 1}
    )
    run = search(cfg)
    ok = [r for r in run.leaderboard if r["status"] == "ok"]
    assert len(ok) == 6 and {r["head"] for r in ok} == {"logistic", "ridge", "keras_linear"}
    scores = [r["macro_map"] for r in ok]
    assert scores == sorted(scores, reverse=True) and scores == [r["score"] for r in ok]
    assert any("skipped knn" in n for n in run.notes)
    summary = run.summary()
    assert "ranked by val macro mAP" in summary and "macro_map" in summary and "test macro mAP" in summary
    with open(run.dir / "leaderboard.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:4] == ["rank", "macro_map", "score_std", "micro_map"] and "balanced_accuracy" not in header
    assert "val macro mAP" in (run.dir / "best.toml").read_text()
    # the best trial's score is the mAP of that configuration fitted from scratch, on val
    best = run.best
    with FeatureCache(cache_path) as cache:
        data = Data.from_cache(cache, best["layer"], np.arange(cache.n_rows), False)
        val = cache.rows("val")
        params, chain = json.loads(best["params"]), best["transforms"].split("+")
        fitted = fit_multilabel(data, cache.rows("train"), best["head"], params, chain, val_rows=val)
        P, _ = label_scores(fitted.model, data.take(val))
        assert macro_map(cache.labels[val], P) == pytest.approx(best["score"], abs=2e-3)
    # the refit is a multi-label run that predicts label sets
    refit = run.refit.metrics
    assert refit.multilabel and refit.head == best["head"] and refit["search"]["trial"] == best["key"]
    _, results = predict(str(run.refit_dir), [str(tmp / "data" / "m0001.png")], cfg)
    assert results[0].labels is not None and results[0].error is None
    # a rerun resumes: no new trial, the same refit run
    again = search(cfg)
    assert again.n_run == 0 and again.n_reused == len(run.leaderboard)
    assert again.refit.reused and again.refit_dir == run.refit_dir
    assert [r["key"] for r in again.leaderboard] == [r["key"] for r in run.leaderboard]
    # runs ls shows macro mAP where single-label runs show accuracy
    ls = run_cli("runs", "ls", "--cache", str(cache_path))
    assert ls.returncode == 0, ls.stderr
    line = next(x for x in ls.stdout.splitlines() if x.startswith(run.refit_dir.name))
    assert f"mAP {refit.split('test')['macro_map']:.2f}" in line
    search_line = next(x for x in ls.stdout.splitlines() if x.startswith(run.dir.name))
    assert f"mAP {best['score']:.2f}" in search_line


def test_cv_search_uses_plain_folds_and_the_builtin_space_parses(mosaics):
    from pipeline.stages.search import search
    from pipeline.tuning.space import load_space

    tmp, _, _ = mosaics
    space = tmp / "ridge.toml"
    space.write_text('[[heads]]\nname = "ridge"\nparams = { alpha = [30.0, 3000.0] }\n')
    run = search(_cfg(tmp, **{"search.space": str(space), "search.cv": 3, "search.n_jobs": 1}), refit=False)
    assert [r["status"] for r in run.leaderboard] == ["ok", "ok"] and run.refit is None
    assert any("plain (unstratified) k-fold" in n for n in run.notes)
    assert "3-fold CV macro mAP" in run.summary()
    builtin = load_space(None, "top", multilabel=True)
    assert {e.head for e in builtin.entries} == {
        "logistic",
        "ridge",
        "linear_svm",
        "keras_linear",
    }


def test_streaming_is_refused_up_front_and_solver_warnings_reach_the_leaderboard(mosaics, tmp_path):
    from pipeline.stages.search import search
    from pipeline.utils.errors import FeatcacheError

    tmp, _, _ = mosaics
    with pytest.raises(FeatcacheError, match="multi-label heads train in memory only"):
        search(_cfg(tmp, **{"search.space": str(tmp / "space.toml"), "train.streaming": "stream"}))
    space = tmp_path / "space.toml"  # liblinear stopped after 2 iterations: a plain (off-path) fit
    space.write_text(
        '[[heads]]\nname = "linear_svm"\nparams = { C = [10.0], dual = [true], max_iter = [2] }\n'
    )
    keys = {"search.space": str(space), "search.strategy": "grid", "search.n_jobs": 1, "search.refit": False}
    run = search(_cfg(tmp, **keys))
    (row,) = run.leaderboard
    assert row["status"] == "ok" and "ConvergenceWarning" in row["warning"], row
    with open(run.dir / "leaderboard.csv", newline="") as f:
        assert "ConvergenceWarning" in next(csv.DictReader(f))["warning"]
