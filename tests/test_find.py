"""``featcache find``: the cached rows nearest to images, keys and words, as CLI subprocesses on a real
photo folder extracted by the real backbone; answers checked against our own exact cosine search of the
cache's features, exact and through the FAISS index (forced with ``index.exact_below``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, write_photo_folder


def _selection(root: Path) -> list[str]:
    """The flags that pick ``root/photos``' cache in ``root/cache`` (64 px)."""
    return [
        "--data",
        str(root / "photos"),
        "--cache-dir",
        str(root / "cache"),
        "--image-size",
        "64",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(selection flags, image folder, cache file): 20 real photo crops, extracted once."""
    root = tmp_path_factory.mktemp("find")
    write_photo_folder(root / "photos")
    sel = _selection(root)
    proc = run_cli("extract", *sel)
    assert proc.returncode == 0, proc.stderr
    (cache,) = (root / "cache").glob("*.h5")
    return sel, root / "photos", cache


def _truth(cache: Path, rows_q: np.ndarray | None = None, Q: np.ndarray | None = None):
    """(keys, labels, splits, cosine matrix of the queries against every row), by plain numpy."""
    from pipeline.cache.store import FeatureCache

    with FeatureCache(cache) as c:
        X = c.features()
        keys, labels = c.keys, [c.class_names[i] for i in c.labels]
        splits = [("train", "val", "test")[s] for s in c.split]
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Q = Xn[rows_q] if Q is None else Q / np.linalg.norm(Q, axis=1, keepdims=True)
    return keys, labels, splits, Q @ Xn.T


def _find(sel, *args):
    proc = run_cli("find", *sel, *args)
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 and "--json" in args else None)


@pytest.mark.parametrize("exact_below", ["100000", "5"])  # exact search, then the FAISS index
def test_find_by_key_is_exact_cosine_search_without_the_key_itself(photos, exact_below):
    sel, _, cache = photos
    keys, labels, splits, S = _truth(cache, np.arange(2))
    proc, out = _find(
        sel,
        "--key",
        keys[0],
        "--key",
        keys[1],
        "--top-k",
        "5",
        "--json",
        "--set",
        f"index.exact_below={exact_below}",
    )
    assert proc.returncode == 0, proc.stderr
    assert [q["query"] for q in out] == keys[:2] and all(q["kind"] == "key" for q in out)
    for i, q in enumerate(out):
        S[i, i] = -np.inf  # a key is not its own neighbour
        want = np.argsort(-S[i], kind="stable")[:5]
        got = [keys.index(n["key"]) for n in q["neighbors"]]
        assert got == want.tolist()
        for n, r in zip(q["neighbors"], want, strict=True):
            assert set(n) >= {"key", "label", "split", "similarity"}
            assert (n["label"], n["split"]) == (labels[r], splits[r])
            assert n["similarity"] == pytest.approx(S[i, r], abs=1e-4)
    index = list(cache.parent.glob("*.index"))
    assert bool(index) == (exact_below == "5")  # the FAISS index is kept beside the cache


def test_find_by_image_reads_the_cache_or_runs_the_caches_own_backbone(photos, tmp_path):
    sel, folder, cache = photos
    cached = sorted(folder.glob("flower/*.jpg"))[0]
    copy = tmp_path / "q" / "copy.png"  # the same pixels as a cached JPEG, other bytes: computed again
    copy.parent.mkdir()
    Image.open(cached).save(copy)
    proc, out = _find(sel, str(cached), str(copy.parent), "--top-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [q["features"] for q in out] == ["cache", "computed"]
    rel = cached.relative_to(folder).as_posix()
    assert out[0]["neighbors"][0]["key"] == rel and out[0]["neighbors"][0]["similarity"] == pytest.approx(
        1, abs=1e-5
    )
    assert out[1]["neighbors"][0]["key"] == rel and out[1]["neighbors"][0]["similarity"] > 0.97
    proc = run_cli("find", *sel, str(copy), "--top-k", "2")  # the table: rank, similarity, split, label, key
    assert proc.returncode == 0 and rel in proc.stdout and "cosine" in proc.stdout


def test_find_filters_by_split_and_class(photos):
    sel, _, cache = photos
    keys, labels, splits, S = _truth(cache, np.arange(1))
    proc, out = _find(
        sel, "--key", keys[0], "--split", "train", "--class", "flower", "--top-k", "50", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    got = out[0]["neighbors"]
    want = [r for r in range(len(keys)) if r != 0 and splits[r] == "train" and labels[r] == "flower"]
    assert sorted(n["key"] for n in got) == sorted(keys[r] for r in want)
    assert [n["similarity"] for n in got] == sorted((n["similarity"] for n in got), reverse=True)


def _own_copy(photos, root: Path) -> tuple[Path, list[str], list[str]]:
    """A copy of the photos under ``root`` with a cache of its own: (root, its selection flags, its keys)."""
    shutil.copytree(photos[1], root / "photos")
    sel = _selection(root)
    assert run_cli("extract", *sel).returncode == 0
    (c,) = (root / "cache").glob("*.h5")
    return root, sel, _truth(c)[0]


def test_a_stale_damaged_or_foreign_index_is_rebuilt_never_served(photos, tmp_path):
    root, grown, keys = _own_copy(photos, tmp_path / "grow")
    force = ["--set", "index.exact_below=5", "--top-k", "30", "--json"]
    proc, first = _find(grown, "--key", keys[0], *force)
    (index,) = (root / "cache").glob("*.index")
    meta = json.loads((index / "meta.json").read_text())
    assert meta["rows"] == meta["built_rows"] == 20
    write_photo_folder(root / "photos", per_class=3, seed=5, start=50)  # a later extract adds 6 rows...
    assert run_cli("extract", *grown).returncode == 0
    proc, grew = _find(grown, "--key", keys[0], *force)
    meta = json.loads((index / "meta.json").read_text())
    assert (meta["rows"], meta["built_rows"]) == (26, 20)  # ...added to the index, not rebuilt
    assert len(grew[0]["neighbors"]) == 25 and "rebuilding" not in proc.stderr
    with open(index / "index.faiss", "r+b") as f:  # damaged: flipped bytes
        f.seek(200)
        f.write(b"\xff\xfe\xfd")
    proc, again = _find(grown, "--key", keys[0], *force)
    assert proc.returncode == 0 and "damaged" in proc.stderr and again == grew
    meta = json.loads((index / "meta.json").read_text())
    (index / "meta.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))  # another cache's
    proc, again = _find(grown, "--key", keys[0], *force)
    assert proc.returncode == 0 and "another cache" in proc.stderr and again == grew


def test_an_index_build_killed_midway_leaves_nothing_served_and_is_cleaned(photos, tmp_path):
    """``kill -9`` while the index folder is being written: no index is served (none exists yet), and
    the next build removes the dead writer's temporary folder and writes a whole index."""
    import signal
    import subprocess
    import sys
    import time

    root, grown, keys = _own_copy(photos, tmp_path / "killed")
    key = keys[0]
    force = ["--set", "index.exact_below=5", "--top-k", "3", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "find", *grown, "--key", key, *force],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((root / "cache").glob(".*.tmp.index")):
            break  # the index folder is being written
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not list((root / "cache").glob(".*.tmp.index")):  # the build won the race: stage its leftover
        (index,) = (root / "cache").glob("*.index")
        shutil.copytree(index, index.with_name(f".{index.name}.{proc.pid}.tmp.index"))
        shutil.rmtree(index)
    assert not list((root / "cache").glob("[!.]*.index")), "no index may exist before a build finished"
    done, answer = _find(grown, "--key", key, *force)
    assert done.returncode == 0 and len(answer[0]["neighbors"]) == 3, done.stderr
    assert not list((root / "cache").glob(".*.tmp.index")), "the dead build's folder was left behind"
    (index,) = (root / "cache").glob("*.index")
    assert (index / "meta.json").is_file()


def test_find_bad_input_is_one_line_exit_2(photos, tmp_path):
    sel, _, cache = photos
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    cases = {
        ("--key", "no/such.jpg"): "not in the cache",
        ("--text", "a red sneaker"): "needs a backbone with a text tower",
        (str(tmp_path / "missing.jpg"),): "image not found",
        ("--key", _truth(cache)[0][0], "--class", "dog"): "no such class",
        ("--key", "x", "--split", "holdout"): "unknown split",
        (): "nothing to find",
    }
    for args, says in cases.items():
        proc = run_cli("find", *sel, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("cache: ")]
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = run_cli("find", *sel, str(bad), "--json")  # an image that does not decode: its entry says why
    assert proc.returncode == 2 and "could not be read" in proc.stderr
    assert json.loads(proc.stdout)[0]["error"]


def test_find_api_and_index_kinds():
    """The Python form, and the index type chosen from rows and a memory budget (autofaiss's order)."""
    import pipeline
    from pipeline.index.kinds import choose_kind

    assert callable(pipeline.find)
    assert choose_kind(100_000, 1280, 4).factory == "HNSW32,Flat"
    assert choose_kind(1_000_000, 1280, 4).factory == "IVF4096,SQ8"  # full vectors would not fit 4 GiB
    assert choose_kind(1_000_000, 1280, 4.8).factory == "IVF4096,Flat"  # the vectors fit, a graph not
    assert choose_kind(1_000_000, 1280, 8).factory == "HNSW32,Flat"
    assert choose_kind(1_000_000, 1280, 0.5).factory.startswith("IVF4096,PQ")
    assert choose_kind(1_000_000, 1280, 0.5).bytes(1_000_000, 1280) <= 0.5 * 1024**3


@pytest.mark.slow
def test_find_on_a_cluster_gives_what_one_process_gives(photos, tmp_path):
    """``--cluster local:2``: the query images' features come from Dask workers (extraction's shard tasks),
    the search runs here — the same answers as one process."""
    sel, folder, _ = photos
    queries = tmp_path / "q"
    write_photo_folder(queries, per_class=2, seed=9, start=100)  # not in the cache: computed
    args = [str(queries), "--top-k", "3", "--json"]
    one, two = run_cli("find", *sel, *args), run_cli("find", *sel, *args, "--cluster", "local:2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "cluster: a local cluster of 2 workers" in two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert [q["features"] for q in b] == ["computed"] * 4
    for x, y in zip(a, b, strict=True):
        assert [n["key"] for n in x["neighbors"]] == [n["key"] for n in y["neighbors"]]
        assert [n["similarity"] for n in y["neighbors"]] == pytest.approx(
            [n["similarity"] for n in x["neighbors"]], abs=1e-4
        )
