"""A cache belongs to its source: which data, which cache, which run — never a silent switch.

The walk a new user takes with two datasets of their own in folders of the same name (``a/imgs``,
``b/imgs``, with different classes), as CLI subprocesses on real photo crops at 32 px: each is extracted
into a cache of its own, each trains on its own classes, a renamed folder reuses its features by content,
and a stage whose cache has no runs names the cache of the same data that has them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, write_photo_folder

from pipeline.cache.store import FeatureCache


def _cli(*args: str, cache_dir: Path, cwd: Path):
    return run_cli(*args, "--cache-dir", str(cache_dir), "--quiet", cwd=cwd)


def _extract(src: Path, cache_dir: Path, size: int = 32):
    r = _cli(
        "extract", "--data", str(src), "--image-size", str(size), cache_dir=cache_dir, cwd=src.parents[1]
    )
    assert r.returncode == 0, r.stderr
    return r


def _line(out: str, prefix: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith(prefix)]
    return line


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict:
    """``a/imgs`` (china/flower, 5 each) and ``b/imgs`` (sea/tree, 4 each), extracted in turn."""
    root = tmp_path_factory.mktemp("twins")
    a, b = root / "a" / "imgs", root / "b" / "imgs"
    write_photo_folder(a, per_class=5)
    write_photo_folder(b, per_class=4, seed=7)
    (b / "china").rename(b / "sea")
    (b / "flower").rename(b / "tree")
    cache_dir = root / "cache"
    out = {"root": root, "a": a, "b": b, "cache_dir": cache_dir}
    for name, src in (("a", a), ("b", b)):
        r = _extract(src, cache_dir)
        out[f"{name}_cache"] = Path(_line(r.stdout, "cache: ").removeprefix("cache: "))
        out[f"{name}_summary"] = r.stdout
    return out


def test_two_sources_named_alike_get_a_cache_each_and_keep_their_rows(twins):
    t = twins
    assert t["a_cache"].name != t["b_cache"].name  # same dataset name, same settings: two files
    assert " 0 removed" in t["b_summary"] and "10 extracted" in t["a_summary"]
    with (
        FeatureCache(t["cache_dir"] / t["a_cache"].name) as a,
        FeatureCache(t["cache_dir"] / t["b_cache"].name) as b,
    ):
        assert (a.n_rows, a.class_names, a.meta["source_id"]) == (10, ["china", "flower"], str(t["a"]))
        assert (b.n_rows, b.class_names, b.meta["source_id"]) == (8, ["sea", "tree"], str(t["b"]))
    listed = run_cli("cache", "ls", "--cache-dir", str(t["cache_dir"])).stdout
    assert f"({t['a']})" in listed and f"({t['b']})" in listed
    # a's rows are still there after b's extraction, and a rerun of a has nothing to do
    again = _extract(t["a"], t["cache_dir"])
    assert "0 extracted · 10 reused" in again.stdout and " 0 removed" in again.stdout


@pytest.mark.parametrize("name", ["a", "b"])
def test_each_source_trains_on_its_own_classes(twins, name):
    t = twins
    r = _cli("train", "--data", str(t[name]), cache_dir=t["cache_dir"], cwd=t["root"])
    assert r.returncode == 0, r.stderr
    note = _line(r.stderr, "cache: ")
    assert t[f"{name}_cache"].name in note and f"from {t[name]}:" in note and "32 px" in note
    run = Path(r.stdout.strip().splitlines()[-1].removeprefix("run: "))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == (["china", "flower"] if name == "a" else ["sea", "tree"])
    assert Path(metrics["cache"]["path"]).name == t[f"{name}_cache"].name


def test_a_source_with_no_cache_is_not_served_another_of_the_same_name(twins, tmp_path):
    c = tmp_path / "c" / "imgs"
    write_photo_folder(c, per_class=2, seed=3)
    r = _cli("train", "--data", str(c), cache_dir=twins["cache_dir"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"no cache of {c}" in r.stderr and "belong to" in r.stderr and str(twins["a"]) in r.stderr


def test_a_renamed_folder_reuses_its_features_by_content(twins, tmp_path):
    """A copy under another name gets a cache of its own, every row copied from a's: nothing extracted,
    the same features, a's cache untouched."""
    import shutil

    moved = tmp_path / "renamed"
    shutil.copytree(twins["a"], moved)
    before = (twins["cache_dir"] / twins["a_cache"].name).stat().st_mtime_ns
    r = _extract(moved, twins["cache_dir"])
    assert "0 extracted · 10 reused" in r.stdout and "no backbone work" in r.stdout
    assert f"reused by content: 10 rows from {twins['a_cache'].name}" in r.stdout
    new = twins["cache_dir"] / Path(_line(r.stdout, "cache: ").removeprefix("cache: ")).name
    with FeatureCache(new) as n, FeatureCache(twins["cache_dir"] / twins["a_cache"].name) as a:
        assert n.meta["source_id"] == str(moved) and n.layers == a.layers
        by_id = dict(zip(a.ids, a.features(), strict=True))
        for i, f in zip(n.ids, n.features(), strict=True):
            assert (f == by_id[i]).all()
    assert (twins["cache_dir"] / twins["a_cache"].name).stat().st_mtime_ns >= before  # touched, not rebuilt
    # --rebuild takes nothing from other caches
    again = _cli(
        "extract",
        "--data",
        str(moved),
        "--image-size",
        "32",
        "--rebuild",
        cache_dir=twins["cache_dir"],
        cwd=tmp_path,
    )
    assert (
        again.returncode == 0 and "10 extracted" in again.stdout and "reused by content" not in again.stdout
    )


def test_stages_name_the_cache_of_the_same_data_that_has_the_runs(tmp_path):
    """Runs on the 32-px cache, then a 48-px extraction (now the newest, no runs): every stage that needs
    a run says so in one line, naming the 32-px cache and ``--image-size 32``; with it, they work."""
    photos = tmp_path / "photos"
    write_photo_folder(photos, per_class=4)
    cache_dir = tmp_path / "cache"
    _extract(photos, cache_dir, 32)
    assert _cli("train", "--data", str(photos), cache_dir=cache_dir, cwd=tmp_path).returncode == 0
    _extract(photos, cache_dir, 48)
    for stage in (("export", "--format", "keras"), ("finetune", "--epochs", "1"), ("report",)):
        r = _cli(*stage, "--data", str(photos), cache_dir=cache_dir, cwd=tmp_path)
        assert r.returncode == 2, (stage, r.stderr)
        err = r.stderr.strip().splitlines()[-1]
        assert "no finished runs of" in err and "48 px" in err and "add --image-size 32" in err, err
        assert "Traceback" not in r.stderr
    assert not list(cache_dir.glob("*.report.html"))  # no empty page
    ok = _cli("report", "--data", str(photos), "--image-size", "32", cache_dir=cache_dir, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
