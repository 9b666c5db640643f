"""Multi-label through every command, as a user runs them: ``featcache extract → train → search → finetune →
predict → export → predict`` on real mosaics, predictions on held-out mosaics scored against the classes
planted in them, and a Keras sigmoid head rebuilt end to end. Real subprocesses, real weights, 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.mosaics import CLASSES, HAVE_FASHION, write_mosaics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset) not installed"),
]

SIZE = ["--image-size", "32", "--quiet"]


def _ok(*args: str):
    res = run_cli(*args)
    assert res.returncode == 0, (args, res.stderr[-2000:])
    return res


def _new_run(runs: Path, before: set[str]) -> Path:
    new = [
        p for p in runs.iterdir() if p.is_dir() and p.name not in before and (p / "metrics.json").is_file()
    ]
    assert len(new) == 1, new
    return new[0]


def _f1(truth: list[set[str]], rows: list[dict]) -> float:
    """Micro F1 of the predicted label sets against the planted ones."""
    tp = fp = fn = 0
    for want, row in zip(truth, rows, strict=True):
        got = {x["class"] for x in row["labels"]}
        tp, fp, fn = tp + len(got & want), fp + len(got - want), fn + len(want - got)
    return 2 * tp / max(2 * tp + fp + fn, 1)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mle2e")
    write_mosaics(tmp / "data", 400, seed=5)
    held = write_mosaics(tmp / "held", 40, seed=99)  # never extracted: predict runs the backbone on them
    (tmp / "held" / "labels.csv").unlink()
    sel = ["--data", str(tmp / "data" / "labels.csv"), "--cache-dir", str(tmp / "cache"), *SIZE]
    runs = tmp / "cache" / "runs"
    _ok("extract", *sel)
    _ok("train", *sel)
    trained = _new_run(runs, set())
    before = {p.name for p in runs.iterdir()}
    _ok("search", *sel, "--n-trials", "6")
    searched = _new_run(runs, before)
    ft = ["--set", "finetune.epochs=1", "--set", "finetune.batch_size=16"]
    _ok("finetune", "--run", str(trained), "--cache-dir", str(tmp / "cache"), *ft, "--quiet")
    tuned = _new_run(runs / "finetune", set())
    return {"tmp": tmp, "held": held, "runs": (trained, searched, tuned)}


def _predict(model: Path, folder: Path) -> list[dict]:
    res = _ok("predict", "--model", str(model), "--json", "--top-k", "2", "--quiet", str(folder))
    rows = sorted(json.loads(res.stdout), key=lambda r: r["image"])
    assert all(
        r["error"] is None and set(r["predictions"][0]) == {"class", "index", "probability"} for r in rows
    )
    return rows


def test_every_run_predicts_the_planted_classes_of_held_out_mosaics(flow):
    """Each run (train, search's refit, finetune) labels mosaics it never saw far better than chance: the
    F1 of always answering the most common label set is about 0.4 on these mosaics."""
    for run in flow["runs"]:
        m = json.loads((run / "metrics.json").read_text())
        assert m["task"] == "multilabel" and set(m["thresholds"]) == set(CLASSES.values())
        rows = _predict(run, flow["tmp"] / "held")
        assert len(rows) == 40
        assert _f1(flow["held"], rows) > 0.7, (run.name, _f1(flow["held"], rows))


def test_export_predicts_what_the_run_predicts(flow):
    trained = flow["runs"][0]
    out = flow["tmp"] / "export"
    res = _ok(
        "export", "--run", str(trained), "--format", "keras,tflite", "--out", str(out), "--json", "--quiet"
    )
    info = json.loads((out / "export.json").read_text())
    assert (
        info["task"] == "multilabel"
        and info["thresholds"] == json.loads((trained / "metrics.json").read_text())["thresholds"]
    ), res.stdout
    want = _predict(trained, flow["tmp"] / "held")
    for model in ("model.keras", "model.tflite"):
        got = _predict(out / model, flow["tmp"] / "held")
        for g, w in zip(got, want, strict=True):
            probs = {x["class"]: x["probability"] for x in w["predictions"]}
            near = {c for c, p in probs.items() if abs(p - info["thresholds"][c]) < 1e-3}
            assert {x["class"] for x in g["labels"]} - near == {x["class"] for x in w["labels"]} - near, model


def test_a_keras_sigmoid_head_rebuilds_to_its_stage2_scores(flow):
    from pipeline.model.rebuild import equivalence, rebuild
    from pipeline.stages.train import train

    tmp = flow["tmp"]
    run = train(
        data=str(tmp / "data" / "labels.csv"),
        cache_dir=str(tmp / "cache"),
        image_size=32,
        head="keras_linear",
    )
    rb = rebuild(run.run_dir)
    assert rb.multilabel and rb.head.layers[-1].get_config()["activation"] == "sigmoid"
    eq = equivalence(rb, "test")
    assert eq["n"] > 20 and eq["max_abs_diff"] <= 1e-4, eq


def test_the_single_label_twin_cache_has_no_trace_of_multilabel(flow, tmp_path):
    """The same images with one label each stay a single-label cache: no task, int labels, softmax run."""
    from pipeline.cache.store import FeatureCache

    tmp = flow["tmp"]
    rows = [line.split(",") for line in (tmp / "data" / "labels.csv").read_text().splitlines()[1:]]
    single = ["path,label"] + [f"{tmp / 'data' / p},{(labs.split(';')[0] or 'blank')}" for p, labs in rows]
    (tmp_path / "single.csv").write_text("\n".join(single) + "\n")
    _ok("extract", "--data", str(tmp_path / "single.csv"), "--cache-dir", str(tmp_path / "cache"), *SIZE)
    (path,) = (tmp_path / "cache").glob("*.h5")
    with FeatureCache(path) as c:
        assert not c.multilabel and "task" not in c.meta and c.labels.dtype == np.int64
    _ok("train", "--data", str(tmp_path / "single.csv"), "--cache-dir", str(tmp_path / "cache"), *SIZE)
    (run,) = (tmp_path / "cache" / "runs").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    assert "task" not in m and "thresholds" not in m and "accuracy" in m["test"]
