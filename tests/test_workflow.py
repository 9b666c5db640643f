"""The workflow a new user walks: later stages follow the cache just made, and bad input answers at once.

Real caches (EfficientNet-Lite0, real photo crops at 32 and 48 px) in one folder; the stages find them by
the rule documented in docs/cache.md ("Which cache a stage takes").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, small_config, write_photo_folder

from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory) -> dict:
    """One photo folder extracted at 48 px, then at 32 px (the newest), plus a second dataset at 32 px
    extracted first (so it is the oldest)."""
    from pipeline.stages.extract import extract

    root = tmp_path_factory.mktemp("workflow")
    photos, other = root / "photos", root / "other"
    write_photo_folder(photos, per_class=4)
    write_photo_folder(other, per_class=3, seed=5)
    cache_dir = root / "cache"
    paths = {}
    for name, src, size in (("other_cache", other, 32), ("48", photos, 48), ("32", photos, 32)):
        ov = small_config(cache_dir, src, **{"backbone.image_size": size})
        paths[name] = Path(extract(load_config(None, ov)).path).resolve()
        time.sleep(0.05)  # distinct modification times
    return {"root": root, "photos": photos, "other": other, "cache_dir": cache_dir, **paths}


def _select(two_sizes, **ov):
    from pipeline.cache.locate import select_cache

    return select_cache(load_config(None, {"extract.cache_dir": str(two_sizes["cache_dir"]), **ov}))


def test_later_stages_take_the_newest_cache_unless_settings_pin_it(two_sizes):
    t = two_sizes
    photos = str(t["photos"])
    # the dataset named: its newest cache (32 px, made last), not the default size's
    choice = _select(t, **{"data.source": photos})
    assert choice.path == t["32"]
    assert "newest cache of photos" in choice.note and "--cache FILE" in choice.note
    # an explicit setting selects exactly the cache that has it
    assert _select(t, **{"data.source": photos, "backbone.image_size": "48"}).path == t["48"]
    # no dataset named: the newest cache in the folder, whatever its dataset
    assert _select(t).path == t["32"]
    assert _select(t, **{"data.source": str(t["other"])}).path == t["other_cache"]
    # --cache names the file: no note, no search
    assert _select(t, **{"train.cache": str(t["48"])}).note == ""
    # extract touches the cache it made or found: rerunning the 48-px extraction makes it the newest
    from pipeline.stages.extract import extract

    extract(load_config(None, small_config(t["cache_dir"], t["photos"], **{"backbone.image_size": 48})))
    assert _select(t, **{"data.source": photos}).path == t["48"]
    # settings that no cache has: one line naming what there is
    with pytest.raises(
        FeatcacheError,
        match=r"has image_size=64 \(there are: .*photos from .*photos: efficientnet_lite0, 32 px",
    ):
        _select(t, **{"data.source": photos, "backbone.image_size": "64"})
    with pytest.raises(FeatcacheError, match="has pooling=max"):
        _select(t, **{"backbone.pooling": "max"})


def test_a_config_file_equal_to_the_defaults_chooses_nothing(two_sizes):
    from pipeline.cache.locate import select_cache
    from pipeline.utils.config import given_keys

    cfg = load_config(REPO / "configs" / "default.toml", {"extract.cache_dir": str(two_sizes["cache_dir"])})
    assert given_keys(cfg) == {"extract.cache_dir"}
    assert select_cache(cfg).path in (two_sizes["32"], two_sizes["48"])  # the newest, not Fashion-MNIST


def test_cli_train_follows_the_cache_and_says_which(two_sizes, tmp_path):
    t = two_sizes
    r = run_cli(
        "train", "--data", str(t["photos"]), "--image-size", "32", "--cache-dir", str(t["cache_dir"]),
        "--set", f"train.runs_dir={tmp_path}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("cache: ")]
    assert len(notes) == 1 and str(t["32"]) in notes[0] and "to pick another" in notes[0]
    run = Path(r.stdout.strip().splitlines()[-1].removeprefix("run: "))
    assert run.is_absolute() and (run / "manifest.json").is_file()


def test_runs_of_a_cache_outside_the_cache_folder_are_found_by_id_prefix(two_sizes, tmp_path):
    """Runs of ``--cache FILE`` are written beside that file, wherever it is; every command that takes a run
    (``runs show``, ``finetune --run``, ``export --run``, ``predict --model``) finds them there by a unique
    prefix of their id, and says which runs a prefix matches or where it looked."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = elsewhere / two_sizes["32"].name
    shutil.copy(two_sizes["32"], cache)
    sel = ("--cache", str(cache))
    runs = {}
    for head, extra in (("logistic", ()), ("knn", ("--param", "k=1"))):
        r = run_cli("train", *sel, "--head", head, *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        runs[head] = Path(r.stdout.strip().splitlines()[-1].removeprefix("run: "))
        assert runs[head].parent == (elsewhere / "runs").resolve()
    logistic, knn = runs["logistic"], runs["knn"]
    assert not (tmp_path / "cache").exists()  # nothing under the default cache folder

    r = run_cli("runs", "show", logistic.name[:-2], *sel, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert logistic.name in r.stdout and "logistic" in r.stdout

    both = os.path.commonprefix([logistic.name, knn.name])
    r = run_cli("runs", "show", both, *sel, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "is ambiguous: 2 runs start with it" in r.stderr
    assert logistic.name in r.stderr and knn.name in r.stderr

    r = run_cli("export", "--run", "2026-no-such-run", *sel, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "run not found: 2026-no-such-run" in r.stderr and str((elsewhere / "runs").resolve()) in r.stderr

    r = run_cli("finetune", "--run", knn.name[:-2], *sel, cwd=tmp_path)  # refused before any work
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"run {knn.name}: head 'knn' cannot be converted" in r.stderr
    assert f"the best run that can is {logistic.name}" in r.stderr  # the runs of the same cache, beside it

    r = run_cli("export", "--run", knn.name[:-2], *sel, "--format", "keras", cwd=tmp_path)
    assert r.returncode == 2 and "KNeighborsClassifier cannot be converted" in r.stderr, r.stderr

    config = tmp_path / "featcache.toml"
    config.write_text(f"[train]\ncache = {json.dumps(str(cache))}\n")
    photo = sorted(two_sizes["photos"].rglob("*.png"))[0]
    r = run_cli("predict", "--model", logistic.name[:-2], "--config", str(config), str(photo), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    column = header.split().index("features")  # the run's cache served the photo's features
    assert row.split()[column] == "cache", r.stdout


def test_errors_about_paths_and_names_answer_before_tensorflow(tmp_path):
    """`train --data /missing`, a bad head, export's unknown format, predict's missing file: one line,
    exit 2, and TensorFlow (or scikit-learn) never imported."""
    probe = (
        "import sys; from pipeline.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    missing = str(tmp_path / "missing")
    cases = {
        ("train", "--data", missing, "--cache-dir", str(tmp_path)): "data source not found",
        ("search", "--data", missing, "--cache-dir", str(tmp_path)): "data source not found",
        ("finetune", "--data", missing, "--cache-dir", str(tmp_path)): "data source not found",
        ("train", "--head", "nope"): "unknown head 'nope'",
        ("train", "--cache-dir", str(tmp_path)): "no cache in",
        ("export", "--run", str(tmp_path), "--format", "coreml"): "unknown format 'coreml'",
        ("export", "--run", str(tmp_path), "--format", "onnx"): "no manifest.json",
        ("predict", "--model", missing, str(tmp_path)): "not found",
        ("predict", "--model", str(tmp_path), missing): "not a model",
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for args, message in cases.items():
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, cwd=REPO
        )
        took = time.perf_counter() - t0
        assert "HEAVY [] CODE 2" in r.stdout, (args, r.stdout, r.stderr[-1500:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
        assert took < 20, (args, took)  # generous: the point is that nothing heavy loads


def test_a_class_too_small_for_its_split_gets_a_note_suggesting_cv():
    import numpy as np

    from pipeline.data.splits import small_class_note

    labels = np.array([0] * 40 + [1] * 10)
    split = np.array(([0] * 30 + [1] * 5 + [2] * 5) + ([0] * 8 + [1] * 1 + [2] * 1))
    note = small_class_note(labels, split, ["pullover", "dress"])
    assert note and "dress (1 in val)" in note and "dress (1 in test)" in note and "--cv" in note
    assert "pullover" not in note
    assert small_class_note(np.repeat([0, 1], 100), np.tile([0] * 80 + [1] * 10 + [2] * 10, 2), "ab") is None


def test_a_run_predicts_images_and_finds_its_own_in_the_cache(two_sizes, tmp_path):
    """``pipeline.Run(...).predict`` is ``featcache predict --model``: the photos of the run's cache are
    served from it, and each gets its top classes."""
    import pipeline

    cfg = load_config(None, {"train.cache": str(two_sizes["32"]), "train.runs_dir": str(tmp_path)})
    run = pipeline.Run(pipeline.train(cfg))
    photos = sorted(two_sizes["photos"].rglob("*.*"))
    results = run.predict(two_sizes["photos"], top_k=2)  # a folder, walked as predict walks it
    assert [r.image for r in results] == [str(p) for p in photos]
    assert all(r.source == "cache" and r.error is None and len(r.top) == 2 for r in results)
    assert {name for r in results for _, name, _ in r.top} == {"china", "flower"}
    (one,) = run.predict(str(photos[0]), top_k=1)
    assert one.top == results[0].top[:1]
