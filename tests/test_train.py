"""Stage 2 training on a real cache: every head beats chance, streaming matches memory, runs round-trip.

One real cache is extracted once per session (scikit-learn's digits, 8×8 gray upscaled to 64 px, through
the real EfficientNet-Lite0 weights) and shared by this module and ``test_search.py``: the second
``extract`` call finds the complete cache and does no backbone work.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError

REPO = Path(__file__).resolve().parents[1]
CHANCE = 0.10  # ten digit classes


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """This machine is shared: OpenBLAS threads spin-waiting on a busy core make small fits 20× slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def train_cfg(
    cache: Path,
    runs: Path,
    head: str,
    params: dict | None = None,
    transforms=("standardize",),
    streaming="auto",
):
    cfg = load_config(
        None,
        {
            "train.cache": str(cache),
            "train.runs_dir": str(runs),
            "train.head": head,
            "train.transforms": ",".join(transforms),
            "train.streaming": streaming,
        },
    )
    cfg.train.params = dict(params or {})
    return cfg


# Fast settings per head: each still a real fit on 1280-dim features of ~1400 training images.
FAST = {
    "logistic": ({}, ("standardize",)),
    "linear_svm": ({"C": 1.0}, ("l2",)),
    "ridge": ({"alpha": 1000.0}, ("standardize",)),
    "knn": ({"n_neighbors": 5}, ("l2",)),
    "mlp": ({"hidden": [128]}, ("standardize",)),
    "hgb": ({"max_iter": 40}, ("standardize", "pca:16")),
    "keras_linear": ({"epochs": 8, "learning_rate": 0.01, "batch_size": 128}, ("standardize",)),
    "keras_mlp": ({"epochs": 6, "hidden": [128], "batch_size": 128}, ("standardize",)),
}


@pytest.fixture(scope="module")
def runs(digits_cache, tmp_path_factory):
    """One real run per head, trained once and inspected by several tests."""
    from pipeline.stages.train import train

    root = tmp_path_factory.mktemp("runs")
    return {
        head: train(train_cfg(digits_cache, root, head, params, transforms))
        for head, (params, transforms) in FAST.items()
    }


@pytest.mark.parametrize("head", list(FAST))
def test_every_head_beats_chance_and_writes_a_complete_run(runs, head):
    run = runs[head]
    m = json.loads((run.run_dir / "metrics.json").read_text())
    assert m["test"]["accuracy"] >= 0.6 > CHANCE + 0.4, f"{head}: test accuracy {m['test']['accuracy']:.3f}"
    assert m["val"]["accuracy"] >= 0.6
    assert not run.streamed and m["streamed"] is False
    for split in ("val", "test"):
        s = m[split]
        assert {
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "log_loss",
            "per_class",
            "confusion_matrix",
        } <= set(s)
        assert set(s["per_class"]["3"]) >= {"precision", "recall"}
        cm = np.asarray(s["confusion_matrix"])
        assert (
            cm.shape == (10, 10)
            and cm.sum() == s["n"]
            and np.trace(cm) / s["n"] == pytest.approx(s["accuracy"])
        )
        assert (run.run_dir / f"confusion_{split}.png").stat().st_size > 1000
    assert m["class_names"] == [str(i) for i in range(10)] and m["head_classes"] == list(range(10))
    assert m["cache"]["fingerprint"] and Path(m["cache"]["path"]).is_file() and m["layer"] == "top_activation"
    assert m["transforms"] == list(FAST[head][1]) and len(m["transform_chain"]) == len(FAST[head][1])
    assert m["config"]["train"]["head"] == head
    rows = (run.run_dir / "misclassified.csv").read_text().splitlines()
    assert rows[0] == "key,true,predicted,probability,split"
    for split in ("test", "val"):  # every wrong prediction of both splits, each row naming its split
        wrong = np.asarray(m[split]["confusion_matrix"])
        assert sum(r.endswith("," + split) for r in rows[1:]) == m[split]["n"] - np.trace(wrong)
        assert m[split]["misclassified"] == m[split]["n"] - np.trace(wrong)
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert {"metrics.json", "misclassified.csv", *manifest["model_files"]} <= set(manifest["files"])
    if head.startswith("keras"):
        assert (run.run_dir / "learning_curves.png").is_file() and (run.run_dir / "head.keras").is_file()
        assert m["history"]["val_loss"], "early stopping watched the val split"
    else:
        assert (run.run_dir / "model.skops").is_file()


def test_probabilities_are_real_or_declared(runs):
    assert runs["logistic"].metrics["test"]["log_loss"] < 1.0
    assert runs["linear_svm"].metrics["test"]["log_loss"] is None  # margins are not probabilities
    assert "decision_function" in runs["linear_svm"].metrics["probabilities"]


def test_sklearn_run_round_trips_and_refuses_tampering(runs, digits_cache, tmp_path):
    from pipeline.cache.store import FeatureCache
    from pipeline.heads.persist import load_model, load_run

    run = runs["logistic"]
    with FeatureCache(digits_cache) as c:
        X = c.features(None, c.rows("test"))
    loaded = load_run(run.run_dir)
    np.testing.assert_array_equal(loaded.model.predict(X), run.model.predict(X))
    np.testing.assert_allclose(loaded.model.predict_proba(X), run.model.predict_proba(X))
    assert loaded.class_names == [str(i) for i in range(10)] and loaded.layer == "top_activation"

    flipped = tmp_path / "flipped"
    shutil.copytree(run.run_dir, flipped)
    data = bytearray((flipped / "model.skops").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "model.skops").write_bytes(bytes(data))
    with pytest.raises(FeatcacheError, match=r"model\.skops: sha256 differs"):
        load_model(flipped)

    truncated = tmp_path / "truncated"
    shutil.copytree(run.run_dir, truncated)
    with open(truncated / "model.skops", "r+b") as f:
        f.truncate(100)
    with pytest.raises(FeatcacheError, match="truncated"):
        load_model(truncated)

    edited = tmp_path / "edited"
    shutil.copytree(run.run_dir, edited)
    (edited / "metrics.json").write_text((edited / "metrics.json").read_text().replace('"0"', '"zero"', 1))
    with pytest.raises(FeatcacheError, match="metrics.json"):
        load_model(edited)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run.run_dir, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(FeatcacheError, match="did not finish"):
        load_model(unfinished)


def test_keras_run_round_trips_and_refuses_tampering(runs, digits_cache, tmp_path):
    from pipeline.cache.store import FeatureCache
    from pipeline.heads.keras_head import KerasHead
    from pipeline.heads.persist import load_model

    run = runs["keras_mlp"]
    with FeatureCache(digits_cache) as c:
        X = c.features(None, c.rows("test"))
    model = load_model(run.run_dir)
    assert isinstance(model.steps[-1][1], KerasHead)
    np.testing.assert_allclose(model.predict_proba(X), run.model.predict_proba(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.predict(X), run.model.predict(X))

    bad = tmp_path / "bad"
    shutil.copytree(run.run_dir, bad)
    with open(bad / "head.keras", "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.truncate()
    with pytest.raises(FeatcacheError, match=r"head\.keras.*truncated"):
        load_model(bad)


def test_streaming_matches_memory_and_really_streams(runs, digits_cache, tmp_path, monkeypatch):
    """The default head streams the same full-batch fit: every pass over the HDF5 chunks one loss and
    gradient, so it lands where the in-memory fit does; a partial_fit head (linear SVM) still streams SGD."""
    from sklearn.linear_model import SGDClassifier

    from pipeline.stages.train import train

    memory = runs["logistic"]
    monkeypatch.setenv("FEATCACHE_MEMORY_BUDGET", "1000")  # 1 kB: "auto" must choose streaming
    streamed = train(train_cfg(digits_cache, tmp_path, "logistic", {}, ("standardize",), streaming="auto"))
    assert streamed.streamed is True and streamed.metrics["streamed"] is True
    fit = streamed.metrics["fit"]
    assert fit["estimator"] == memory.metrics["fit"]["estimator"] == "BlasLogisticRegression"
    assert fit["passes"] >= fit["n_iter"] > 0 and fit["chunk_reads"] >= fit["passes"]
    assert "epochs" not in fit and fit.get("partial_fit_calls", 0) == 0
    scaler = streamed.model.named_steps["standardize"]
    assert (
        scaler.n_samples_seen_ == memory.metrics["cache"]["rows"]["train"]
    )  # fitted with partial_fit over chunks
    a, b = memory.model.steps[-1][1], streamed.model.steps[-1][1]
    np.testing.assert_allclose(b.coef_, a.coef_, atol=5e-3 * np.abs(a.coef_).max())
    for split in ("val", "test"):
        assert abs(streamed.metrics[split]["accuracy"] - memory.metrics[split]["accuracy"]) <= 0.005, split

    svm = train(train_cfg(digits_cache, tmp_path, "linear_svm", {}, ("l2",), streaming="stream"))
    assert isinstance(svm.model.steps[-1][1], SGDClassifier)
    assert svm.metrics["fit"]["partial_fit_calls"] >= 20  # ≥ 1 chunk per epoch, 20 epochs
    assert svm.metrics["test"]["accuracy"] >= runs["linear_svm"].metrics["test"]["accuracy"] - 0.06


def test_keras_streams_through_a_generator_with_incremental_pca(runs, digits_cache, tmp_path):
    from sklearn.decomposition import IncrementalPCA

    from pipeline.stages.train import train

    params, _ = FAST["keras_linear"]
    run = train(
        train_cfg(
            digits_cache, tmp_path, "keras_linear", params, ("standardize", "pca:64"), streaming="stream"
        )
    )
    assert run.streamed is True
    assert run.metrics["fit"]["generator_batches"] > 0 and run.metrics["fit"]["partial_fit_calls"] == 0
    assert (
        isinstance(run.model.named_steps["pca"], IncrementalPCA)
        and run.model.named_steps["pca"].n_components_ == 64
    )
    assert run.metrics["test"]["accuracy"] >= runs["keras_linear"].metrics["test"]["accuracy"] - 0.06


def test_heads_without_partial_fit_refuse_to_stream(digits_cache, tmp_path):
    from pipeline.stages.train import train

    with pytest.raises(FeatcacheError, match=r"head 'knn' cannot learn from chunks"):
        train(train_cfg(digits_cache, tmp_path, "knn", streaming="stream"))


def test_binary_heads_and_class_weights(digits_cache):
    """Odd vs even digits: Keras builds Dropout + Dense(1) logit; weights rebalance a skewed task."""
    from pipeline.cache.reader import Data
    from pipeline.cache.store import FeatureCache
    from pipeline.heads.fitting import fit_model, predict_rows

    with FeatureCache(digits_cache) as c:
        data = Data.from_cache(c, c.default_layer(), np.arange(c.n_rows), streamed=False)
        tr, va, te = c.rows("train"), c.rows("val"), c.rows("test")
    data.labels = (data.labels == 0).astype(np.int64)  # "is it a zero?": 10 % positives
    for head, params in (
        ("keras_linear", {"epochs": 5, "learning_rate": 0.01, "batch_size": 128, "class_weight": "balanced"}),
        ("logistic", {"class_weight": "balanced"}),
        ("mlp", {"hidden": [32], "class_weight": "balanced"}),
    ):
        fitted = fit_model(data, tr, va, head, params, ["standardize"])
        pred = predict_rows(fitted.model, data, te, 2)
        assert pred.proba.shape == (len(te), 2)
        recall = (pred.y_pred[pred.y_true == 1] == 1).mean()
        assert (pred.y_pred == pred.y_true).mean() >= 0.9 and recall >= 0.8, head
        if head == "keras_linear":
            layers = fitted.model.steps[-1][1].model_.layers
            assert [type(layer).__name__ for layer in layers[1:]] == ["Dropout", "Dense"]
            assert layers[-1].units == 1


def test_keras_head_is_a_scikit_learn_estimator(digits_cache):
    from sklearn.base import clone
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.cache.store import FeatureCache
    from pipeline.heads.keras_head import KerasHead

    head = KerasHead(hidden=(32,), epochs=5, learning_rate=0.01, batch_size=128)
    twin = clone(head).set_params(dropout=0.1)
    assert twin.get_params()["dropout"] == 0.1 and head.get_params()["dropout"] is None
    assert twin.get_params()["hidden"] == (32,)
    with FeatureCache(digits_cache) as c:
        rows = c.rows("train")[:600]
        X, y = c.features(None, rows), c.labels[rows]
    cv = cross_validate(make_pipeline(StandardScaler(), head), X, y, cv=2, return_estimator=True)
    assert cv["test_score"].min() > 0.6
    fitted = cv["estimator"][0]
    again = pickle.loads(pickle.dumps(fitted))  # the Keras model travels as .keras bytes
    np.testing.assert_allclose(
        again.predict_proba(X[:50]), fitted.predict_proba(X[:50]), rtol=1e-5, atol=1e-6
    )


def test_bad_names_fail_fast_naming_them(digits_cache, tmp_path):
    from pipeline.stages.train import train

    with pytest.raises(FeatcacheError, match=r"unknown head 'nope'"):
        train(train_cfg(digits_cache, tmp_path, "nope"))
    with pytest.raises(FeatcacheError, match=r"head 'logistic': unknown parameter 'gamma'"):
        train(train_cfg(digits_cache, tmp_path, "logistic", {"gamma": 1}))
    with pytest.raises(FeatcacheError, match=r"unknown transform 'whiten'"):
        train(train_cfg(digits_cache, tmp_path, "logistic", transforms=("whiten",)))
    with pytest.raises(FeatcacheError, match=r"head 'logistic'.*C"):
        train(train_cfg(digits_cache, tmp_path, "logistic", {"C": -1}))
    with pytest.raises(FeatcacheError, match="no cache at"):
        train(train_cfg(tmp_path / "missing.h5", tmp_path, "logistic"))
    assert not any(tmp_path.glob("*/manifest.json"))


def test_memory_budget_decides_the_path():
    from pipeline.cache.reader import memory_budget, use_streaming

    assert use_streaming("auto", 10, budget=100) is False
    assert use_streaming("auto", 1000, budget=100) is True
    assert use_streaming("memory", 10**15) is False and use_streaming("stream", 1) is True
    assert memory_budget() > 0


def featcache_command() -> list[str]:
    """The installed ``featcache`` console script (``python -m pipeline`` where it is not installed)."""
    script = Path(sys.executable).with_name("featcache")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [*featcache_command(), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_train_prints_test_accuracy(digits_cache, tmp_path):
    r = _cli(
        "train",
        "--cache",
        str(digits_cache),
        "--head",
        "ridge",
        "--param",
        "alpha=1000",
        "--set",
        f"train.runs_dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr
    assert "test accuracy: 0." in r.stdout and "run: " in r.stdout
    table = [
        row
        for row in (line.split() for line in r.stdout.splitlines())
        if row[:1] in (["val"], ["test"]) and len(row) == 6
    ]
    assert [row[0] for row in table] == ["val", "test"] and all(0.6 < float(row[2]) <= 1 for row in table)
    run_dir = Path(r.stdout.strip().splitlines()[-1].removeprefix("run: "))
    assert json.loads((run_dir / "metrics.json").read_text())["params"] == {"alpha": 1000}


def test_cli_bad_head_is_one_line_exit_2(digits_cache, tmp_path):
    r = _cli("train", "--cache", str(digits_cache), "--head", "nope", "--set", f"train.runs_dir={tmp_path}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown head 'nope'" in lines[0] and "logistic" in lines[0]


def test_cli_bad_param_exit_2(digits_cache, tmp_path, capsys):
    from pipeline.cli import main

    code = main(
        [
            "train",
            "--cache",
            str(digits_cache),
            "--param",
            "nonsense=3",
            "--set",
            f"train.runs_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown parameter 'nonsense'" in err[0]


def test_streamed_chunks_read_exactly_the_requested_rows(digits_cache):
    """Dense runs are read as one slice, rows spread over the file one by one: both give the same rows."""
    from pipeline.cache.reader import Data
    from pipeline.cache.store import FeatureCache

    with FeatureCache(digits_cache) as c:
        layer, n = c.default_layer(), c.n_rows
        everything = c.features(layer)
        data = Data.from_cache(c, layer, np.arange(n), streamed=True)
        for rows in (np.arange(10, 200), np.arange(0, n, 7), np.concatenate([np.arange(5), [n - 1]])):
            seq = data.chunks(rows, batch_size=64)
            got = np.concatenate([seq[i][0] for i in range(len(seq))])
            assert np.array_equal(got, everything[np.sort(rows)])
