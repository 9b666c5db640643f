"""Multi-label datasets end to end, on real images with known truth: 2×2 mosaics of Fashion-MNIST images,
each labelled with the set of classes it shows (a blank cell shows none, so some mosaics have no label)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.mosaics import CLASSES, HAVE_FASHION, write_mosaics
from tests.mosaics import mosaic_config as _cfg

pytestmark = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST (Debian dataset) not installed")


@pytest.fixture(scope="module")
def mosaic_cache(tmp_path_factory):
    from pipeline.stages.extract import extract

    tmp = tmp_path_factory.mktemp("mosaics")
    truth = write_mosaics(tmp / "data", 320)
    result = extract(_cfg(tmp, tmp / "data" / "labels.csv"))
    return tmp, truth, result


def test_csv_labels_column_reads_label_sets(tmp_path):
    from pipeline.data.labels_csv import read_rows

    rows = read_rows(["path,labels", "a.png,bag;boot", "b.png, boot | bag |", "c.png,"], "x.csv", None)
    assert [r.labels for r in rows] == [("bag", "boot"), ("bag", "boot"), ()]
    single = read_rows(["path,label", "a.png,bag"], "y.csv", None)
    assert single[0].labels is None and single[0].label == "bag"


def test_multilabel_cache_holds_a_multi_hot_matrix(mosaic_cache):
    from pipeline.cache.store import FeatureCache

    tmp, truth, result = mosaic_cache
    unlabelled = sum(1 for t in truth if not t)
    assert unlabelled > 0 and result.unlabelled == unlabelled
    assert f"{unlabelled} with no label" in result.summary()
    with FeatureCache(result.path) as c:
        assert c.multilabel and c.meta["task"] == "multilabel"
        assert c.class_names == sorted(CLASSES.values())
        assert c.labels.shape == (320, 4) and c.labels.dtype == np.uint8
        order = {k: i for i, k in enumerate(c.keys)}
        for i, names in enumerate(truth):
            row = c.labels[order[f"m{i:04d}.png"]]
            assert {c.class_names[j] for j in np.flatnonzero(row)} == names
        assert len(c.rows("val")) and len(c.rows("test"))
        for code, split in enumerate(("train", "val", "test")):  # the summary's counts: rows, and positives
            assert result.splits[split] == int((c.split == code).sum())
            positives = c.labels[c.split == code].sum(axis=0)
            assert result.class_rows[split] == {
                n: int(k) for n, k in zip(c.class_names, positives, strict=True)
            }
    assert f"splits: {result.splits['train']} train · {result.splits['val']} val" in result.summary()
    info = run_cli("cache", "info", str(result.path))
    assert info.returncode == 0 and "task: multilabel" in info.stdout, info.stderr


def test_train_one_vs_rest_beats_the_frequency_baseline(mosaic_cache):
    from pipeline.stages.train import train
    from pipeline.utils.run_text import format_run
    from pipeline.utils.runs import describe_run, read_metrics

    tmp, _, result = mosaic_cache
    run = train(_cfg(tmp, tmp / "data" / "labels.csv"), head="logistic", train__params={"C": 0.1})
    m = read_metrics(run.run_dir)
    test = m["test"]
    assert m["task"] == "multilabel" and set(m["thresholds"]) == set(CLASSES.values())
    assert test["macro_map"] > test["map_baseline"] + 0.25, test
    assert 0 <= test["subset_accuracy"] <= 1 and test["label_cardinality"] > 1
    assert {"ap", "threshold", "f1"} <= set(test["per_class"]["bag"])
    assert "macro_mAP" in run.summary() and "label-frequency baseline" in run.summary()
    assert "bag" in format_run(describe_run(run.run_dir))  # runs show reads it


def test_ridge_head_and_refusals(mosaic_cache):
    from pipeline.stages.train import train
    from pipeline.utils.errors import FeatcacheError

    tmp, _, _ = mosaic_cache
    run = train(_cfg(tmp, tmp / "data" / "labels.csv"), head="ridge")
    assert run.metrics["test"]["macro_map"] > run.metrics["test"]["map_baseline"] + 0.2
    with pytest.raises(FeatcacheError, match="does not train on a multi-label cache yet"):
        train(_cfg(tmp, tmp / "data" / "labels.csv"), head="knn")
    with pytest.raises(FeatcacheError, match='class_weight = "balanced" only'):
        train(
            _cfg(tmp, tmp / "data" / "labels.csv"),
            head="keras_linear",
            train__params={"class_weight": {"bag": 2}},
        )


def test_predict_prints_labels_above_their_thresholds(mosaic_cache):
    from pipeline.stages.predict import format_json, format_table, predict
    from pipeline.stages.train import train

    tmp, truth, _ = mosaic_cache
    cfg = _cfg(tmp, tmp / "data" / "labels.csv")
    run = train(cfg, head="logistic", train__params={"C": 0.1})
    thresholds = run.metrics["thresholds"]
    images = [str(tmp / "data" / f"m{i:04d}.png") for i in range(16)]
    _, results = predict(str(run.run_dir), images, cfg, top_k=2)
    hits = 0
    for r, names in zip(results, truth[:16], strict=True):
        probs = [p for _, _, p in r.labels]
        assert probs == sorted(probs, reverse=True) and len(r.top) == 2
        assert all(p >= thresholds[c] for _, c, p in r.labels)
        hits += {c for _, c, _ in r.labels} == names
    assert hits >= 8, hits  # most mosaics get exactly their label set
    out = json.loads(format_json(results))
    assert set(out[0]) == {"image", "predictions", "features", "error", "labels", "novelty", "novel"}
    assert (
        set(out[0]["predictions"][0]) == {"class", "index", "probability"} and len(out[0]["predictions"]) == 2
    )
    assert [x["class"] for x in out[0]["labels"]] == [c for _, c, _ in results[0].labels]
    table = format_table(results)
    assert all(c in table for r in results for _, c, _ in r.labels)


def test_single_label_csv_unchanged(tmp_path):
    """A ``label`` CSV stays single-label: no task attribute, int labels."""
    from pipeline.cache.store import FeatureCache
    from pipeline.stages.extract import extract

    root = tmp_path / "data"
    write_mosaics(root, 24)
    lines = (root / "labels.csv").read_text().splitlines()[1:]
    rows = ["path,label"] + [
        f"{p},{'bag' if 'bag' in labs else 'other'}" for p, labs in (x.split(",") for x in lines)
    ]
    (root / "single.csv").write_text("\n".join(rows) + "\n")
    with FeatureCache(extract(_cfg(tmp_path, root / "single.csv")).path) as c:
        assert not c.multilabel and "task" not in c.meta
        assert c.labels.ndim == 1 and c.labels.dtype == np.int64


def _mosaic_files(root: Path, truth: list[set[str]]):
    return [
        (f"m{i:04d}", (root / f"m{i:04d}.png").read_bytes(), sorted(names)) for i, names in enumerate(truth)
    ]


def test_webdataset_json_labels_and_parquet_label_sequences(tmp_path):
    """``{"labels": [...]}`` in a shard's ``.json`` and a Parquet ``labels`` column of ClassLabel indices (the
    Hugging Face ``Sequence(ClassLabel)``, names from the schema) read as the same multi-label data."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cache.store import FeatureCache
    from pipeline.data.sources import load_dataset
    from pipeline.stages.extract import extract

    truth = write_mosaics(tmp_path / "png", 30, seed=3, sep="|")
    files = _mosaic_files(tmp_path / "png", truth)
    names = sorted(CLASSES.values())
    with tarfile.open(tmp_path / "train-0000.tar", "w") as tar:
        for key, data, labels in files:
            for member, body in (
                (f"{key}.png", data),
                (f"{key}.json", json.dumps({"labels": labels}).encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": d, "path": k} for k, d, _ in files], type=image_type),
            "labels": pa.array(
                [[names.index(x) for x in labs] for _, _, labs in files], pa.list_(pa.int64())
            ),
        }
    )
    features = {
        "image": {"_type": "Image"},
        "labels": {"feature": {"names": names, "_type": "ClassLabel"}, "_type": "Sequence"},
    }
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "data.parquet")
    for src in (tmp_path / "train-0000.tar", tmp_path / "data.parquet"):
        ds = load_dataset(_cfg(tmp_path, src).data, tmp_path / "index")
        assert ds.multilabel and ds.class_names == names
        assert [set(s.labels) for s in ds.samples] == truth
    with FeatureCache(extract(_cfg(tmp_path, tmp_path / "data.parquet")).path) as c:
        assert c.multilabel and c.labels.shape == (30, 4)
        assert [{names[j] for j in np.flatnonzero(row)} for row in c.labels] == truth


def test_a_run_with_malformed_thresholds_is_one_line_naming_its_metrics(mosaic_cache, tmp_path):
    import shutil

    from pipeline.stages.predict import predict
    from pipeline.stages.train import train
    from pipeline.utils.errors import FeatcacheError
    from pipeline.utils.runs import read_metrics, write_manifest

    tmp, _, _ = mosaic_cache
    cfg = _cfg(tmp, tmp / "data" / "labels.csv")
    run = train(cfg, head="ridge")
    good = read_metrics(run.run_dir)
    assert (
        good.thresholds == [good["thresholds"][c] for c in good.class_names] and good.score_key == "macro_map"
    )
    one = dict(list(good["thresholds"].items())[:1])
    bad_values = (None, one, {**good["thresholds"], "ghost": 0.5}, dict.fromkeys(good["thresholds"], "x"))
    for i, bad in enumerate(
        (*bad_values, dict.fromkeys(good["thresholds"], 1.5), dict.fromkeys(good["thresholds"], float("nan")))
    ):
        d = tmp_path / f"run{i}"
        shutil.copytree(run.run_dir, d)
        data = json.loads((d / "metrics.json").read_text())
        data["thresholds"] = bad
        (d / "metrics.json").write_text(json.dumps(data))
        with pytest.raises(FeatcacheError, match=r"metrics\.json: not a run featcache wrote") as e:
            read_metrics(d).thresholds  # noqa: B018
        assert str(d) in str(e.value) and "\n" not in str(e.value)
    manifest = json.loads((tmp_path / "run1" / "manifest.json").read_text())
    write_manifest(tmp_path / "run1", manifest["kind"], manifest["model_files"])  # a consistent run folder
    with pytest.raises(FeatcacheError, match=r"run1/metrics\.json: not a run featcache wrote"):
        predict(str(tmp_path / "run1"), [str(tmp / "data" / "m0000.png")], cfg)


def test_positive_weights_leave_an_always_present_class_at_one():
    from pipeline.heads.keras_head import positive_weights

    Y = np.array([[1, 0, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]], np.uint8)
    Y0 = np.hstack([Y, np.zeros((4, 1), np.uint8)])  # and a class nobody has
    np.testing.assert_allclose(positive_weights(Y0, "balanced"), [1.0, 3.0, 3.0, 1.0])
    assert positive_weights(Y0, None) is None


def test_probe_with_an_empty_val_split_and_the_class_it_names(mosaic_cache):
    from pipeline.cache.store import FeatureCache
    from pipeline.tuning.probe import Split, multilabel_probe

    _, _, result = mosaic_cache
    with FeatureCache(result.path) as cache:
        train, test = (Split.of(*cache.xy(s)) for s in ("train", "test"))
    empty = Split(train.x[:0], train.y[:0])
    out = multilabel_probe(train, empty, test)  # as the single-label probe: val scores 0, the smallest C
    assert out["val_map"] == 0.0 and 0 < out["test_map"] <= 1
    y = train.y.copy()
    y[:, 2] = 1  # class 2 is in every row; the rarest class (argmin of the counts) is fine
    assert int(np.argmin(y.sum(axis=0))) != 2
    with pytest.raises(ValueError, match="class 2 is not both present and absent"):
        multilabel_probe(Split(train.x, y), test, test)
