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
    old, old_search = _train(cache), _search(cache, root)
    write_photo_folder(photos, per_class=8, seed=7, start=8)
    assert _extract(photos, cache_dir) == cache  # the same cache file, grown
    new, new_search = _train(cache), _search(cache, root)
    return {
        "root": root, "photos": photos, "cache_dir": cache_dir, "cache": cache, "old": old, "new": new,
        "searches": (old_search, new_search),
    }  # fmt: skip


def _search(cache: Path, root: Path) -> str:
    """A two-trial grid search, no refit: its folder's name."""
    space = root / "space.toml"
    space.write_text('[[heads]]\nname = "ridge"\nparams = { alpha = [0.1, 10.0] }\n')
    r = _cli(
        "search", "--cache", str(cache), "--space", str(space), "--strategy", "grid", "--no-refit", "--quiet"
    )
    return next(Path(w).parent.name for w in r.stdout.split() if "/search-" in w)


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
    assert (
        not next(x for x in text.splitlines() if x.startswith(grown["new"].name)).rstrip().endswith("stale")
    )
    assert "stale: scored on an older state" in text
    shown = _cli("runs", "show", grown["old"].name, "--cache", str(grown["cache"])).stdout
    assert f"val {old['val_n']} rows" in shown and "STALE" in shown
    assert (
        "the cache's current rows"
        in _cli("runs", "show", grown["new"].name, "--cache", str(grown["cache"])).stdout
    )


def test_a_search_after_the_cache_grew_starts_afresh_and_the_old_one_is_stale(grown):
    old, new = grown["searches"]
    assert old != new  # not the old folder, whose trials were scored on the old rows
    rows = {r["id"]: r for r in _ls(grown["cache"])}
    assert (rows[old]["state"], rows[new]["state"]) == ("stale", "current")
    assert rows[old]["val_n"] < rows[new]["val_n"]


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
        # the two stale runs and the old search's two trials
        assert "4 leaderboard rows were scored on an older state of the cache" in r.stdout
        html = out.read_text()
        current, stale = html.split("<h3>Stale runs</h3>")
        assert grown["new"].name in current and grown["old"].name not in current
        assert grown["old"].name in stale and stale_copy.name in stale
        assert grown["searches"][0] in stale and grown["searches"][1] in current
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
        f"no runs of {other_cache.name} in {grown['cache_dir'].resolve() / 'runs'}; it holds 4 runs of other"
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
    mine = [grown["old"].name, grown["new"].name, *grown["searches"]]
    assert {r["id"]: r["cache"] for r in rows} == {
        **dict.fromkeys(mine, grown["cache"].name),
        run.name: other_cache.name,
    }
    assert {r["id"]: r["state"] for r in rows}[grown["old"].name] == "stale"


def test_a_moved_cache_folder_keeps_its_runs(grown, tmp_path):
    """Runs are matched to their cache by its file name, so a copied or moved cache folder lists them."""
    moved = tmp_path / "moved"
    shutil.copytree(grown["cache_dir"], moved)
    rows = {r["id"]: r["state"] for r in _ls(moved / grown["cache"].name)}
    assert rows[grown["old"].name] == "stale" and rows[grown["new"].name] == "current"


@pytest.mark.parametrize("version", ["v0.1", "v0.2"])
def test_runs_from_before_the_state_list_as_unknown_and_stale_only_when_a_size_differs(version, tmp_path):
    """0.1/0.2 runs record split sizes, no digest: listed (the cache folder moved: matched by file name),
    marked ``?`` and ranked as before; a val size that differs from the cache's makes one stale."""
    tree = tmp_path / version
    shutil.copytree(Path(__file__).parent / "fixtures" / version, tree)
    (cache,) = (tree / "cache").glob("*.h5")
    rows = _ls(cache)
    assert rows and all(r["state"] == "unknown" and r["val_n"] == 6 and r["test_n"] == 3 for r in rows)
    text = _cli("runs", "ls", "--cache", str(cache)).stdout
    assert all(x.rstrip().endswith("?") for x in text.splitlines()[1 : 1 + len(rows)])
    assert "state unknown" in _cli("runs", "show", rows[0]["id"], "--cache", str(cache)).stdout
    run = tree / "cache" / "runs" / rows[0]["id"]
    m = json.loads((run / "metrics.json").read_text())
    m["val"]["n"] = m["cache"]["rows"]["val"] = 5  # scored on 5 val rows: not the cache's 6
    (run / "metrics.json").write_text(json.dumps(m))
    states = {r["id"]: r["state"] for r in _ls(cache)}
    assert states[rows[0]["id"]] == "stale" and list(states.values()).count("unknown") == len(rows) - 1


def test_a_fine_tuned_run_records_the_state_it_was_scored_on(grown):
    r = _cli(
        "finetune", "--cache", str(grown["cache"]), "--run", grown["new"].name, "--epochs", "1", "--quiet"
    )
    ft = Path(r.stdout.strip().splitlines()[-1].removeprefix("run: ").strip())
    m, source = read_metrics(ft), read_metrics(grown["new"])
    assert m.kind == "finetune" and m.cache["state"] == source.cache["state"]
    assert m.cache["rows"] == {s: v["n"] for s, v in source.cache["state"].items()}
    row = next(r for r in _ls(grown["cache"]) if r["id"] == ft.name)
    assert (row["kind"], row["state"], row["val_n"]) == ("finetune", "current", m.split("val")["n"])
