"""Stage 3: the rebuilt end-to-end model equals the stage-2 head, and fine-tuning keeps what must stay frozen.

A real cache (two classes of real photo crops, 64 px, the real EfficientNet-Lite0 weights) is made once
per session and shared with ``test_predict_export.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, small_config, write_photo_folder

from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError

TOL = 1e-4  # the bar: max |Δ probability| between the rebuilt model and the stage-2 head


def _quiet_env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def stage3_setup(base: Path) -> dict:
    """Idempotent: photos → cache (24 images, 64 px) → a logistic run. Later calls reuse all of it."""
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    root = base / "featcache-stage3"
    photos = root / "photos"
    if not photos.exists():
        write_photo_folder(photos, per_class=12)
    overrides = small_config(
        root / "cache", photos, **{"data.val_fraction": "0.3", "data.test_fraction": "0.2"}
    )
    extract(load_config(None, overrides))
    marker = root / "logistic-run.txt"
    if marker.exists() and Path(marker.read_text()).is_dir():
        run = Path(marker.read_text())
    else:
        run = train(load_config(None, overrides)).run_dir
        marker.write_text(str(run))
    return {"root": root, "photos": photos, "overrides": overrides, "run": run}


def finetune_overrides(setup: dict, **extra) -> dict:
    return {
        **setup["overrides"],
        "finetune.run": str(setup["run"]),
        "finetune.batch_size": "8",
        "finetune.learning_rate": "1e-4",
        "finetune.patience": "0",
        **extra,
    }


@pytest.fixture(scope="session")
def stage3(tmp_path_factory) -> dict:
    return stage3_setup(tmp_path_factory.getbasetemp())


def _train(setup: dict, head: str, transforms: str) -> Path:
    from pipeline.stages.train import train

    cfg = load_config(None, {**setup["overrides"], "train.head": head, "train.transforms": transforms})
    return train(cfg).run_dir


# --------------------------------------------------------------------------------------------- head conversion


def _head_cases():
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    return {
        "logistic": lambda: LogisticRegression(max_iter=500),
        "linear_svm": lambda: LinearSVC(),
        "ridge": lambda: RidgeClassifier(),
        "sgd_log_ovr": lambda: SGDClassifier(loss="log_loss", random_state=0),
        "sgd_hinge": lambda: SGDClassifier(loss="hinge", random_state=0),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0),
    }, {
        "standardize": lambda: [("standardize", StandardScaler())],
        "l2+pca_whiten": lambda: [("l2", Normalizer()), ("pca", PCA(6, whiten=True, random_state=0))],
        "standardize+ipca": lambda: [("standardize", StandardScaler()), ("pca", IncrementalPCA(5))],
        "none": lambda: [],
    }


@pytest.mark.parametrize("n_classes", [2, 4])
def test_every_linear_head_converts_exactly(n_classes):
    """Each convertible scikit-learn head × transform chain: the Keras head outputs what stage 2 reports."""
    import warnings

    from sklearn.pipeline import Pipeline

    from pipeline.model.convert import build_head_model, stage2_scores
    from pipeline.model.layers import quantizable

    rng = np.random.default_rng(n_classes)
    centers = rng.normal(0, 3, (n_classes, 12))
    y = rng.integers(0, n_classes, 300)
    X = (centers[y] + rng.normal(0, 2, (300, 12))).astype(np.float32)
    heads, transforms = _head_cases()
    worst = {}
    for hname, make_head in heads.items():
        for tname, make_steps in transforms.items():
            pipe = Pipeline(make_steps() + [("head", make_head())])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe.fit(X, y)
            want, calibrated = stage2_scores(pipe, X, n_classes)
            model = build_head_model(pipe, X.shape[1], n_classes, calibrated)
            got = np.asarray(model(X, training=False), np.float64)
            worst[(hname, tname)] = float(np.abs(got - want).max())
            with quantizable(model):  # the int8-friendly form quantized exports trace: the same function
                q = np.asarray(model(X, training=False), np.float64)
            worst[(hname, tname, "quantizable")] = float(np.abs(q - want).max()) / 10  # held to 1e-4
    bad = {k: v for k, v in worst.items() if not v <= 1e-5}
    assert not bad, bad


def test_keras_heads_and_missing_classes_convert_exactly():
    """Keras heads are copied layer by layer; a head that never saw a class outputs 0 for it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads.keras_head import KerasHead
    from pipeline.model.convert import build_head_model, stage2_scores

    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (120, 8)).astype(np.float32)
    for n, hidden in ((2, ()), (3, (8,))):
        y = rng.integers(0, n, 120)
        X[:, 0] += y
        pipe = Pipeline(
            [("standardize", StandardScaler()), ("head", KerasHead(hidden=hidden, epochs=2))]
        ).fit(X, y)
        want, cal = stage2_scores(pipe, X, n)
        got = np.asarray(build_head_model(pipe, 8, n, cal)(X), np.float64)
        assert np.abs(got - want).max() <= 1e-5
    y = np.where(rng.random(120) < 0.5, 0, 3)  # classes 1 and 2 of 4 are absent from training
    pipe = Pipeline([("head", LogisticRegression())]).fit(X, y)
    want, cal = stage2_scores(pipe, X, 4)
    got = np.asarray(build_head_model(pipe, 8, 4, cal)(X), np.float64)
    assert got.shape == (120, 4) and np.abs(got - want).max() <= 1e-5 and got[:, 1:3].max() == 0


# --------------------------------------------------------------------------------------------- end to end


def test_rebuilt_model_equals_stage2_head_on_val_images(stage3):
    """Before any fine-tuning: images → rebuilt model == cached features → stage-2 head (max |Δp| ≤ 1e-4)."""
    from pipeline.model.rebuild import equivalence, rebuild

    rb = rebuild(stage3["run"])  # logistic on standardized features (Keras heads: see the unit tests above)
    eq = equivalence(rb, "val")
    assert eq["n"] >= 5 and eq["missing"] == 0
    assert eq["max_abs_diff"] <= TOL, eq
    assert eq["same_predictions"] == eq["n"]
    # raw images of their own size: the shared resize inside the model gives the same answer
    from pipeline.data.decode import decode_image

    img = decode_image(next((stage3["photos"] / "china").glob("*.jpg")))
    raw = np.asarray(img, np.float32)[None]
    from pipeline.data.preprocess import resize_images

    resized = resize_images(raw, rb.image_size, rb.resize).numpy()
    assert np.abs(rb.model(raw).numpy() - rb.model(resized).numpy()).max() <= 1e-6
    # training mode must not change anything either: BatchNorm stays in inference mode, no stochastic depth
    x = np.repeat(resized, 4, axis=0)
    assert np.abs(rb.model(x, training=True).numpy() - rb.model(x, training=False).numpy()).max() <= 1e-6


@pytest.mark.parametrize("policy", ["stretch", "crop", "pad"])
def test_shared_resize_of_an_SxS_image_is_the_identity(policy):
    """Why the fine-tuning pipeline (already S×S) and TFLite (S×S in) see the pixels extraction saw."""
    from pipeline.data.preprocess import resize_images

    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.float32)
    assert np.array_equal(resize_images(x, 64, policy).numpy(), x)


def test_unconvertible_head_is_refused_with_a_suggestion(stage3):
    from pipeline.model.convert import NotConvertible
    from pipeline.model.rebuild import rebuild

    run = _train(stage3, "knn", "standardize")
    with pytest.raises(NotConvertible) as e:
        rebuild(run)
    msg = str(e.value)
    assert "KNeighborsClassifier" in msg and "logistic" in msg and "keras_linear" in msg


def test_bad_unfreeze_is_one_clear_error(stage3):
    from pipeline.stages.finetune import finetune

    cfg = load_config(None, finetune_overrides(stage3, **{"finetune.unfreeze": "top:x"}))
    with pytest.raises(FeatcacheError, match="top:N"):
        finetune(cfg)


# --------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_resumes_after_sigkill_and_keeps_frozen_weights(stage3):
    """A real `featcache finetune` killed with SIGKILL mid-training resumes and reaches the same epoch count;
    the result kept BatchNorm (moving statistics included) and every frozen layer bit for bit, trained the
    unfrozen layers and the head, and wrote before/after metrics in the stage-2 format."""
    import keras

    from pipeline.model.rebuild import rebuild
    from pipeline.model.runners import load_keras
    from pipeline.stages.finetune import finetune, finetune_dir
    from pipeline.utils.runs import verify_run

    epochs = 3
    ov = finetune_overrides(
        stage3,
        **{"finetune.unfreeze": "top:3", "finetune.augment": "flip,contrast", "finetune.keep_worse": "true"},
    )
    args = ["finetune", "--quiet", "--epochs", str(epochs)]
    for k, v in ov.items():
        if k != "extract.progress":
            args += ["--set", f"{k}={v}"]
    cfg = load_config(None, {**ov, "finetune.epochs": str(epochs)})
    run_dir = finetune_dir(stage3["run"], cfg)
    state = run_dir / "checkpoint" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=_quiet_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            epoch = json.loads(state.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            epoch = 0
        if epoch >= 1:
            proc.send_signal(signal.SIGKILL)
            killed_at = epoch
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None, proc.stderr.read().decode()[-2000:]
    assert not (run_dir / "manifest.json").exists() and 1 <= killed_at < epochs

    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=_quiet_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr and f"resumed after epoch {killed_at}" in r.stdout
    verify_run(run_dir)
    assert not (run_dir / "checkpoint").exists()
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["kind"] == "finetune" and m["fit"]["epochs"] == epochs
    assert len(m["history"]["loss"]) == epochs and len(m["fit"]["epoch_seconds"]) == epochs
    for split in ("val", "test"):  # stage-2 format, before and after
        for d in (m["before"][split], m[split]):
            assert {"n", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(
                d
            )
    stage2 = json.loads((stage3["run"] / "metrics.json").read_text())
    assert m["before"]["val"]["accuracy"] == pytest.approx(stage2["val"]["accuracy"])
    assert m["equivalence"]["n"] >= 5 and m["equivalence"]["max_abs_diff"] <= TOL

    unfrozen = set(m["finetune"]["unfrozen_layers"])
    assert unfrozen == {"top_conv", "block7a_project_conv", "block7a_dwconv"}
    before = rebuild(stage3["run"])
    after = load_keras(run_dir / "model.keras")
    cut_after = after.get_layer("core").get_layer("backbone").backbone
    n_bn = changed = kept = 0
    for a, b in zip(before.backbone.layers, cut_after.layers, strict=True):
        assert a.name == b.name
        for wa, wb in zip(a.weights, b.weights, strict=True):
            same = np.array_equal(wa.numpy(), wb.numpy())
            if isinstance(a, keras.layers.BatchNormalization):
                assert same, f"BatchNorm {wa.path} changed"  # gamma, beta, moving_mean, moving_variance
                n_bn += 1
            elif a.name in unfrozen:
                assert not same, f"unfrozen {wa.path} did not train"
                changed += 1
            else:
                assert same, f"frozen {wa.path} changed"
                kept += 1
    assert n_bn == 4 * 49 and changed == 3 and kept == 46
    head_before = before.head.get_layer("head_dense").get_weights()[0]
    head_after = after.get_layer("core").get_layer("head").get_layer("head_dense").get_weights()[0]
    assert not np.array_equal(head_before, head_after)

    again = finetune(cfg)  # same settings: already done, nothing recomputed
    assert again.already_done and again.run_dir == run_dir


# --------------------------------------------------------------------------------------------- augmented views


def test_augmented_views_are_cached_train_rows(stage3, tmp_path):
    """extract.augment_views=K: K deterministic views of each train image become train rows of a separate
    cache (its fingerprint includes K and the recipe); val/test stay the plain images; stage 2 uses them."""
    from pipeline.cache.store import FeatureCache
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    ov = {**stage3["overrides"], "extract.cache_dir": str(tmp_path / "cache"), "extract.augment_views": "1"}
    cfg = load_config(None, ov)
    first = extract(cfg)
    plain = extract(load_config(None, stage3["overrides"]))
    assert first.path != plain.path  # a different fingerprint: never mixed with the plain cache
    with FeatureCache(plain.path) as p, FeatureCache(first.path) as c:
        n_train = len(p.rows("train"))
        assert c.n_rows == p.n_rows + n_train
        for split in ("val", "test"):
            assert [c.keys[i] for i in c.rows(split)] == [p.keys[i] for i in p.rows(split)]
        views = [i for i, k in enumerate(c.keys) if k.endswith("#aug1")]
        assert len(views) == n_train and all(c.split[i] == 0 for i in views)
        orig = {k: i for i, k in enumerate(p.keys)}
        X = c.features(None, np.asarray(views))
        base = p.features(None, np.asarray([orig[c.keys[i][: -len("#aug1")]] for i in views]))
        assert np.all(np.abs(X - base).max(axis=1) > 1e-3)  # each view is a different image
        assert [c.labels[i] for i in views] == [p.labels[orig[c.keys[i][: -len("#aug1")]]] for i in views]
        views_before = X
    again = extract(cfg)
    assert again.extracted == 0  # a rerun finds every view cached
    rebuilt = extract(cfg, rebuild=True)  # recomputed from scratch: the same views, bit for bit
    assert rebuilt.extracted == first.extracted
    with FeatureCache(rebuilt.path) as c:
        X = c.features(None, np.asarray([i for i, k in enumerate(c.keys) if k.endswith("#aug1")]))
    assert np.abs(X - views_before).max() <= 1e-5
    run = train(cfg)
    assert run.metrics["cache"]["rows"]["train"] == 2 * n_train


def test_finetune_refuses_an_unconvertible_run_naming_the_best_that_can(stage3):
    from pipeline.stages.finetune import finetune

    knn = _train(stage3, "knn", "standardize")
    cfg = load_config(None, finetune_overrides(stage3, **{"finetune.run": str(knn)}))
    before = set((knn.parent / "finetune").glob("*")) if (knn.parent / "finetune").exists() else set()
    with pytest.raises(
        FeatcacheError, match=r"head 'knn' cannot be converted.*the best run that can is"
    ) as e:
        finetune(cfg)
    assert "featcache finetune --run " in str(e.value)
    after = set((knn.parent / "finetune").glob("*")) if (knn.parent / "finetune").exists() else set()
    assert after == before  # a refused run leaves no folder (and no lock file) behind


def test_finetune_keeps_the_model_before_when_no_epoch_beats_it(stage3):
    """A learning rate far too high on the whole backbone wrecks it in one epoch: the rebuilt model is
    kept, said in one line, and the learning curves start at epoch 0."""
    from pipeline.stages.finetune import finetune

    ov = finetune_overrides(
        stage3,
        **{
            "finetune.epochs": "1",
            "finetune.unfreeze": "all",
            "finetune.augment": "none",
            "finetune.learning_rate": "10.0",
        },
    )
    result = finetune(load_config(None, ov))
    m = result.metrics
    e0 = m["history_epoch0"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(e0)
    assert e0["val_accuracy"] == pytest.approx(m["before"]["val"]["accuracy"])
    epoch1 = m["history"]["val_loss"][0]
    assert not epoch1 < e0["val_loss"] or m["history"]["val_accuracy"][0] < e0["val_accuracy"]  # worse
    assert m["kept_before"] and m["fit"]["best_epoch"] is None
    assert m["val"]["accuracy"] == pytest.approx(m["before"]["val"]["accuracy"])
    assert m["test"]["accuracy"] == pytest.approx(m["before"]["test"]["accuracy"])
    notes = [line for line in result.summary().splitlines() if "no epoch beat" in line]
    assert len(notes) == 1 and "kept that model" in notes[0]
    assert (result.run_dir / "learning_curves.png").is_file()
