"""Runs know the data they were scored on: each run records its cache's state (rows and a digest per split);
after the cache grew, the old run is stale in ``runs ls``/``runs show`` and the report ranks current runs only.
``runs ls`` lists the runs of the cache it is asked about, and ``--all`` every cache's, grouped.

Real caches (EfficientNet-Lite0 at 32 px on real photo crops), real CLI subprocesses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, write_photo_folder

from pipeline.utils.runs import read_metrics


def _cli(*args: str, cwd: Path | None = None):
    r = run_cli(*args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r


def _extract(photos: Path, cache_dir: Path) -> Path:
    r = _cli(
        "extract", "--data", str(photos), "--cache-dir", str(cache_dir), "--image-size", "32",
        "--set", "data.val_fraction=0.3", "--set", "data.test_fraction=0.3", "--quiet",
    )  # fmt: skip
    (path,) = [p for p in cache_dir.glob("*.h5") if photos.name in p.name]
    assert path.is_file(), r.stdout
    return path


def _train(cache: Path) -> Path:
    r = _cli("train", "--cache", str(cache), "--head", "logistic", "--quiet")
    return Path(r.stdout.strip().splitlines()[-1].removeprefix("run: ").strip())


def _ls(cache: Path, *more: str) -> list[dict]:
    return json.loads(_cli("runs", "ls", "--cache", str(cache), "--json", *more).stdout)


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict:
    """A run trained, then images added and extracted (val and test grew), then a second run."""
    root = tmp_path_factory.mktemp("state")
    photos, cache_dir = root / "photos", root / "cache"
    write_photo_folder(photos, per_class=8)
    cache = _extract(photos, cache_dir)
    old = _train(cache)
    write_photo_folder(photos, per_class=8, seed=7, start=8)
    assert _extract(photos, cache_dir) == cache  # the same cache file, grown
    new = _train(cache)
    return {"root": root, "photos": photos, "cache_dir": cache_dir, "cache": cache, "old": old, "new": new}


def test_a_run_records_the_rows_it_was_scored_on(grown):
    old, new = read_metrics(grown["old"]), read_metrics(grown["new"])
    for m in (old, new):
        state = m.cache["state"]
        assert set(state) == {"train", "val", "test"}
        assert state["val"]["n"] == m.split("val")["n"] and state["test"]["n"] == m.split("test")["n"]
        assert all(s["digest"].startswith("sha256:") for s in state.values())
    assert old.cache["state"]["val"]["n"] < new.cache["state"]["val"]["n"]  # the cache grew in val
    assert old.cache["state"]["val"]["digest"] != new.cache["state"]["val"]["digest"]


def test_the_old_run_is_stale_in_runs_ls_and_show(grown):
    rows = {r["id"]: r for r in _ls(grown["cache"])}
    old, new = rows[grown["old"].name], rows[grown["new"].name]
    assert (old["state"], new["state"]) == ("stale", "current")
    assert old["val_n"] < new["val_n"] and new["cache"] == grown["cache"].name
    text = _cli("runs", "ls", "--cache", str(grown["cache"])).stdout
    line = next(x for x in text.splitlines() if x.startswith(grown["old"].name))
    assert line.rstrip().endswith("stale") and f" {old['val_n']} " in line
    assert not next(x for x in text.splitlines() if x.startswith(grown["new"].name)).rstrip().endswith("stale")
    assert "stale: scored on an older state" in text
    shown = _cli("runs", "show", grown["old"].name, "--cache", str(grown["cache"])).stdout
    assert f"val {old['val_n']} rows" in shown and "STALE" in shown
    assert "the cache's current rows" in _cli("runs", "show", grown["new"].name, "--cache", str(grown["cache"])).stdout


def test_the_report_ranks_current_runs_only(grown, tmp_path):
    # the stale run made to look better on val than anything current: still never the best
    m = json.loads((grown["old"] / "metrics.json").read_text())
    m["val"]["accuracy"] = 1.5
    stale_copy = grown["cache_dir"] / "runs" / (grown["old"].name[:-4] + "beef")
    shutil.copytree(grown["old"], stale_copy)
    try:
        (stale_copy / "metrics.json").write_text(json.dumps(m))
        out = tmp_path / "r.html"
        r = _cli("report", "--cache", str(grown["cache"]), "--set", f"report.out={out}", "--quiet")
        assert f"best on val: {grown['new'].name}" in r.stdout
        assert "2 leaderboard rows were scored on an older state of the cache" in r.stdout
        html = out.read_text()
        current, stale = html.split("<h3>Stale runs</h3>")
        assert grown["new"].name in current and grown["old"].name not in current
        assert grown["old"].name in stale and stale_copy.name in stale
    finally:
        shutil.rmtree(stale_copy)


def test_runs_ls_on_a_runs_folder_of_two_caches(grown):
    """A second dataset's cache in the same folder (so the same runs folder): each lists its own runs;
    one with no runs says how many the folder holds and how to see them; --all groups them by cache."""
    other = grown["root"] / "other"
    write_photo_folder(other, per_class=4, seed=3)
    other_cache = _extract(other, grown["cache_dir"])
    empty = _cli("runs", "ls", "--cache", str(other_cache)).stdout.strip()
    assert empty == (
        f"no runs of {other_cache.name} in {grown['cache_dir'].resolve() / 'runs'}; it holds 2 runs of other"
        " caches: `featcache runs ls --all` lists them"
    )
    run = _train(other_cache)
    assert [r["id"] for r in _ls(other_cache)] == [run.name]
    assert run.name not in {r["id"] for r in _ls(grown["cache"])}
    text = _cli("runs", "ls", "--all", "--cache-dir", str(grown["cache_dir"])).stdout
    headers = [x for x in text.splitlines() if x.startswith("cache ")]
    assert len(headers) == 2
    assert headers[0].startswith(f"cache {grown['cache'].name} · dataset photos · source {grown['photos']}")
    assert headers[1].startswith(f"cache {other_cache.name} · dataset other") and "32 px" in headers[1]
    first, second = text.split(headers[1])
    assert grown["old"].name in first and grown["new"].name in first and run.name in second
    rows = json.loads(_cli("runs", "ls", "--all", "--json", "--cache-dir", str(grown["cache_dir"])).stdout)
    assert {r["id"]: r["cache"] for r in rows} == {
        grown["old"].name: grown["cache"].name,
        grown["new"].name: grown["cache"].name,
        run.name: other_cache.name,
    }
    assert {r["id"]: r["state"] for r in rows}[grown["old"].name] == "stale"


def test_a_moved_cache_folder_keeps_its_runs(grown, tmp_path):
    """Runs are matched to their cache by its file name, so a copied or moved cache folder lists them."""
    moved = tmp_path / "moved"
    shutil.copytree(grown["cache_dir"], moved)
    rows = {r["id"]: r["state"] for r in _ls(moved / grown["cache"].name)}
    assert rows[grown["old"].name] == "stale" and rows[grown["new"].name] == "current"
