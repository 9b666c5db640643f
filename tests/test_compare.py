"""featcache compare: candidates extracted once each through the cache, scored by one linear probe."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.cli import main
from pipeline.stages.compare import compare as compare_stage
from pipeline.stages.compare import format_leaderboard
from pipeline.stages.extract import extract
from pipeline.utils.errors import FeatcacheError

CANDIDATES = """
[[candidate]]
name = "efficientnet_lite0"
image_size = 32

[[candidate]]
label = "lite0-48"
name = "efficientnet_lite0"
image_size = 48

[[candidate]]
name = "mobilenet_v2"
weights = "none"
image_size = 32
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("compare")
    d = load_digits()
    npz = root / "digits.npz"
    np.savez(npz, images=np.clip(d.images * 16, 0, 255).astype(np.uint8), labels=d.target)
    cands = root / "candidates.toml"
    cands.write_text(CANDIDATES)
    kw = {
        "data": str(npz),
        "cache_dir": str(root / "cache"),
        "limit": 300,
        "candidates": str(cands),
        "shots": [1, 3],
        "seeds": 2,
        "extract__progress": False,
    }
    return kw, pipeline.compare(**kw)


class Spy:
    """The extract stage, counting the images it runs through a backbone."""

    def __init__(self):
        self.calls, self.extracted = 0, 0

    def __call__(self, cfg, **kw):
        self.calls += 1
        result = extract(cfg, **kw)
        self.extracted += result.extracted
        return result


def _own_val_accuracy(cache_path: str) -> float:
    """A probe trained here, by hand: L2-normalized features, logistic regression, C swept on val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize
    from threadpoolctl import threadpool_limits

    with pipeline.open_cache(cache_path) as cache:
        (xt, yt), (xv, yv) = cache.xy("train"), cache.xy("val")
    xt, xv = normalize(xt.astype(np.float64)), normalize(xv.astype(np.float64))
    with threadpool_limits(limits=1, user_api="blas"):  # small fits: contended BLAS threads are slow
        return max(
            float(np.mean(LogisticRegression(C=c, max_iter=1000).fit(xt, yt).predict(xv) == yv))
            for c in np.logspace(-2, 4, 7)
        )


def test_leaderboard_ranks_as_a_probe_trained_by_hand(setup):
    _, result = setup
    rows = result.rows
    assert [r["label"] for r in rows if r["label"]] and len(rows) == 3
    assert result.extracted == 3 * 300
    own = [_own_val_accuracy(r["cache"]) for r in rows]
    assert [r["val_accuracy"] for r in rows] == pytest.approx(own)
    assert own == sorted(own, reverse=True)
    assert len({r["cache"] for r in rows}) == 3
    newest = max(Path(rows[0]["cache"]).parent.glob("*.h5"), key=os.path.getmtime)
    assert str(newest) == rows[0]["cache"]  # train and search continue on the winner


def test_the_probes_model_extracts_what_a_plain_extract_does(setup, tmp_path):
    """The check's model is handed to the extraction (built once): the features are a plain extract's."""
    kw, result = setup
    row = next(r for r in result.rows if r["backbone"] == "mobilenet_v2")
    plain = extract(
        data=kw["data"],
        cache_dir=str(tmp_path),
        limit=300,
        backbone="mobilenet_v2",
        weights="none",
        image_size=32,
        extract__progress=False,
    )
    assert Path(plain.path).name == Path(row["cache"]).name
    with pipeline.open_cache(plain.path) as a, pipeline.open_cache(row["cache"]) as b:
        assert a.keys == b.keys and np.array_equal(a.features(), b.features())


def test_the_checks_model_is_handed_over_and_accepted(setup, tmp_path):
    """compare builds each model from its candidate's config: the extraction accepts it, it is not built twice."""
    kw, _ = setup
    cands = tmp_path / "one.toml"
    cands.write_text('[[candidate]]\nname = "mobilenet_v2"\nweights = "none"\nimage_size = 32\n')
    models = []

    def spy(cfg, **options):
        models.append(options.get("feature_model"))
        return extract(cfg, **options)

    result = compare_stage(
        extractor=spy, **{**kw, "cache_dir": str(tmp_path / "cache"), "candidates": str(cands), "limit": 100}
    )
    assert result.extracted == 100 and len(models) == 1
    assert models[0] is not None and models[0].settings["image_size"] == 32


def test_a_second_compare_does_no_backbone_work(setup):
    kw, first = setup
    spy = Spy()
    again = compare_stage(extractor=spy, **kw)
    assert spy.calls == 0 and again.extracted == 0 and again.dir == first.dir
    assert [r["val_accuracy"] for r in again.rows] == [r["val_accuracy"] for r in first.rows]
    other = compare_stage(extractor=spy, **{**kw, "shots": [2]})  # a new compare over the same caches
    assert other.dir != first.dir
    assert spy.calls == 3 and spy.extracted == 0 and other.extracted == 0


def test_bad_candidates_fail_in_one_line_before_any_extraction(setup, tmp_path):
    kw, _ = setup
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[candidate]]\nname = "mobilenet_v2"\nweights = "none"\nimage_size = 40\n\n'
        '[[candidate]]\nlabel = "typo"\nname = "efficientnet_lite9"\n\n'
        '[[candidate]]\nlabel = "nolayer"\nname = "efficientnet_lite0"\nimage_size = 40\nlayers = ["nope"]\n'
    )
    spy, before = Spy(), sorted(Path(kw["cache_dir"]).glob("*.h5"))
    with pytest.raises(FeatcacheError) as e:
        compare_stage(extractor=spy, **{**kw, "candidates": str(bad)})
    msg = str(e.value)
    assert "\n" not in msg and "2 bad candidate" in msg
    assert "typo: unknown backbone 'efficientnet_lite9'" in msg and "nolayer: --layer" in msg
    assert spy.calls == 0
    assert sorted(Path(kw["cache_dir"]).glob("*.h5")) == before


def test_json_and_csv_shape(setup, capsys):
    kw, result = setup
    argv = ["compare", "--data", kw["data"], "--cache-dir", kw["cache_dir"], "--limit", "300", "--quiet"]
    argv += ["--candidates", kw["candidates"], "--shots", "1,3", "--seeds", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["candidates"]
    keys = {"label", "backbone", "layer", "image_size", "cache", "val_accuracy", "test_accuracy", "macro_f1"}
    keys |= {"mean_recall", "dim", "images_per_second", "cpu_seconds", "cache_bytes", "shots"}
    assert all(keys <= set(r) for r in rows)
    assert not any("val_map" in r for r in rows)  # multi-label columns only for a multi-label cache
    vals = [r["val_accuracy"] for r in rows]
    assert vals == sorted(vals, reverse=True)
    assert {r["backbone"] for r in rows} == {"efficientnet_lite0", "mobilenet_v2"}
    assert all(r["dim"] == 1280 and r["images_per_second"] > 0 for r in rows)
    assert all(set(r["shots"]) == {"1", "3"} for r in rows)
    assert all(0 <= r["shots"]["3"]["mean"] <= 1 and r["shots"]["3"]["std"] >= 0 for r in rows)
    with open(result.dir / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == [r["label"] for r in rows]
    assert {"shot_1_mean", "shot_1_std", "shot_3_mean", "shot_3_std"} <= set(table[0])
    assert json.loads((result.dir / "leaderboard.json").read_text())["candidates"] == rows


def test_backbones_list_and_no_candidates(setup):
    kw, result = setup
    base = {k: v for k, v in kw.items() if k != "candidates"}
    with pytest.raises(FeatcacheError, match="no candidates"):
        pipeline.compare(**base)
    spy = Spy()
    got = compare_stage(extractor=spy, **{**base, "backbones": ["efficientnet_lite0"], "image_size": 32})
    assert spy.extracted == 0  # the same settings as the first candidate: its cache
    assert (
        got.rows[0]["cache"]
        == result.rows[[r["label"] for r in result.rows].index("efficientnet_lite0@32")]["cache"]
    )


def _own_val_map(cache_path: str) -> float:
    """The multi-label probe trained here, by hand: L2-normalized features, one logistic regression per
    class, C swept on val by macro mAP (the classes with a positive val row)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from threadpoolctl import threadpool_limits

    with pipeline.open_cache(cache_path) as cache:
        (xt, yt), (xv, yv) = cache.xy("train"), cache.xy("val")
    # divided as the protocol does: random MobileNetV2 features are near-collinear, so even a last-bit
    # difference (sklearn's normalize) moves the large-C fits
    xt, xv = (
        x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True) for x in (xt, xv)
    )
    present = np.flatnonzero(yv.sum(axis=0) > 0)
    best = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        for c in np.logspace(-2, 4, 7):
            p = np.stack(
                [
                    LogisticRegression(C=c, max_iter=1000).fit(xt, yt[:, j]).predict_proba(xv)[:, 1]
                    for j in present
                ],
                axis=1,
            )
            best = max(
                best,
                float(np.mean([average_precision_score(yv[:, j], p[:, i]) for i, j in enumerate(present)])),
            )
    return best


def test_multilabel_cache_ranks_by_val_map(tmp_path):
    from tests.mosaics import HAVE_FASHION, write_mosaics

    if not HAVE_FASHION:
        pytest.skip("Fashion-MNIST (Debian dataset) not installed")
    write_mosaics(tmp_path / "data", 200)
    cands = tmp_path / "candidates.toml"
    cands.write_text(CANDIDATES.replace("image_size = 48", 'image_size = 32\nlayers = ["block5c_add"]'))
    result = pipeline.compare(
        data=str(tmp_path / "data" / "labels.csv"),
        cache_dir=str(tmp_path / "cache"),
        candidates=str(cands),
        shots=[2],
        seeds=2,
        extract__progress=False,
    )
    rows = result.rows
    assert len(rows) == 3 and all(r["val_accuracy"] is None and r["test_accuracy"] is None for r in rows)
    own = [_own_val_map(r["cache"]) for r in rows]
    assert [r["val_map"] for r in rows] == pytest.approx(own)
    assert own == sorted(own, reverse=True)
    for r in rows:
        assert 0 < r["test_map"] <= 1 and 0 < r["micro_map"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert 0 < r["shots"]["2"]["mean"] <= 1
    with open(result.dir / "leaderboard.csv") as f:
        header = next(csv.reader(f))
    assert header[header.index("test_accuracy") + 1 :][:3] == ["val_map", "test_map", "micro_map"]
    assert "val mAP" in result.summary()


def test_compare_counts_what_each_candidate_extracted_and_prices_only_that(setup):
    """A candidate whose cache held most images extracted only the new ones, and its cost is per image it
    extracted; one whose cache held them all extracted nothing and is "cached", not the cheapest."""
    from html.parser import HTMLParser

    from pipeline.stages.report.comparison import Compared, compare_section

    kw, first = setup
    assert all(r["extracted"] == 300 and r["reused"] == 0 for r in first.rows)
    spy = Spy()
    grown = compare_stage(extractor=spy, **{**kw, "limit": 310})  # 10 new images for every candidate
    assert spy.extracted == grown.extracted == 3 * 10
    for r in grown.rows:
        assert (r["extracted"], r["reused"]) == (10, 300)
        assert r["cpu_seconds_per_image"] == pytest.approx(r["cpu_seconds"] / 10)
    assert "10 extracted, 300 reused from its cache" in grown.summary()
    cached = compare_stage(extractor=spy, **{**kw, "limit": 310, "shots": [2]})  # same caches, new compare
    assert spy.extracted == 30 and all(r["extracted"] == 0 and r["reused"] == 310 for r in cached.rows)
    assert all(r["cpu_seconds_per_image"] is None for r in cached.rows)
    table = format_leaderboard(cached.rows)
    assert table.splitlines()[0].split().count("extracted") == 1 and table.count("cached") == len(cached.rows)
    again = compare_stage(extractor=spy, **{**kw, "limit": 310, "shots": [2]})  # journaled: no extraction
    assert "images this call: 0" in again.summary() and "scored before" in again.summary()

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cells: list[str] = []

        def handle_data(self, data):
            self.cells.append(data)

    page = Cells()
    page.feed(compare_section(Compared(cached.dir, cached.rows), Path(cached.rows[0]["cache"])))
    assert page.cells.count("cached") == len(cached.rows)
