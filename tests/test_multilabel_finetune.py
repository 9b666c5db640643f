"""Multi-label runs end to end: the rebuilt model (sigmoid outputs) equals the stage-2 one-vs-rest head,
fine-tuning with binary cross-entropy writes a multi-label run with thresholds chosen again on val, every
export format matches Keras, and predict from an export gives the labels predict on the run gives.

Real data: 2×2 Fashion-MNIST mosaics (tests/mosaics.py), 32 px, the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.utils.config import load_config
from tests.mosaics import CLASSES, HAVE_FASHION, write_mosaics

pytestmark = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset) not installed")

TOL = 1e-4  # the bar single-label runs meet: max |Δ probability| rebuilt model vs the stage-2 head


def _cfg(tmp: Path, **extra):
    return load_config(
        None,
        {
            "data.source": str(tmp / "data" / "labels.csv"),
            "extract.cache_dir": str(tmp / "cache"),
            "backbone.image_size": 32,
            "extract.batch_size": 32,
            "extract.progress": False,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    """~200 mosaics → a multi-label cache → a logistic and a ridge run."""
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    tmp = tmp_path_factory.mktemp("mlft")
    truth = write_mosaics(tmp / "data", 200, seed=1)
    extract(_cfg(tmp))
    logistic = train(_cfg(tmp), head="logistic", train__params={"C": 0.1}).run_dir
    ridge = train(_cfg(tmp), head="ridge").run_dir
    return {"tmp": tmp, "truth": truth, "logistic": logistic, "ridge": ridge}


@pytest.fixture(scope="module")
def finetuned(ml):
    from pipeline.stages.finetune import finetune

    cfg = _cfg(ml["tmp"], **{"finetune.epochs": 1, "finetune.batch_size": 16, "finetune.unfreeze": "top:1"})
    return finetune(cfg, run=str(ml["logistic"]))


@pytest.mark.parametrize("head", ["logistic", "ridge"])
def test_rebuilt_model_equals_the_stage2_scores(ml, head):
    from pipeline.model.rebuild import equivalence, rebuild

    rb = rebuild(ml[head])
    assert rb.multilabel and rb.head_check is not None and rb.head_check <= 1e-5
    assert rb.head.layers[-1].get_config()["activation"] == "sigmoid"
    eq = equivalence(rb)
    assert eq["n"] > 10 and eq["max_abs_diff"] <= TOL, eq
    # each class's threshold is one val image's score, so that image's label may flip by float rounding
    assert eq["same_predictions"] >= eq["n"] - len(CLASSES), eq


def test_finetune_writes_a_multilabel_run(ml, finetuned):
    from pipeline.utils.runs import describe_run, format_run, read_metrics

    m = read_metrics(finetuned.run_dir)
    assert m.multilabel and set(m["thresholds"]) == set(CLASSES.values())
    assert all(0.0 <= t <= 1.0 for t in m["thresholds"].values())
    assert m["equivalence"]["max_abs_diff"] <= TOL
    assert m["fit"]["epochs"] == 1 and "loss" in m["history"]
    for split in ("val", "test"):
        assert 0.0 < m[split]["macro_map"] <= 1.0 and "per_class" in m[split]
    assert m["test"]["macro_map"] > m["test"]["map_baseline"], m["test"]
    assert m["head_alone"]["val"] == read_metrics(ml["logistic"])["val"]["macro_map"]
    assert "mAP" in finetuned.summary()
    assert "macro_mAP" in format_run(describe_run(finetuned.run_dir))
