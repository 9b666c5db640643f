"""Caches and run folders written by earlier releases keep working: no re-extraction, no retraining.

``tests/fixtures/v0.1/`` was written by featcache 0.1 (before the layered package layout): a tiny cache,
a scikit-learn run and a Keras-head run, the probabilities both gave on the cached features, and the
fingerprint of the default configuration. ``tests/fixtures/v0.2/`` is today's layout, written by today's
``extract`` and ``train`` (so a later change to it shows here): the same ``tiny.npz`` at 32 px, cut at
``block1a_project_bn`` (16 features, to keep it small), one logistic run (skops) and its probabilities.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.fingerprint import feature_key, fingerprint, weights_digest
from pipeline.cache.locate import resolve_cache_path
from pipeline.cache.store import FeatureCache
from pipeline.features.backbones.registry import get_spec
from pipeline.heads.persist import PickleRefused, load_run
from pipeline.utils.config import load_config

FIXTURE = Path(__file__).parent / "fixtures" / "v0.1"
TODAY = Path(__file__).parent / "fixtures" / "v0.2"
TODAY_LAYER = "block1a_project_bn"


@pytest.fixture
def old_tree(tmp_path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "v0.1")
    return tmp_path / "v0.1"


@pytest.fixture
def today_tree(tmp_path) -> Path:
    shutil.copytree(TODAY, tmp_path / "v0.2")
    return tmp_path / "v0.2"


def _default_key(**overrides):
    cfg = load_config(None, overrides)
    spec = get_spec(cfg.backbone.name)
    return feature_key(cfg, spec, weights_digest(spec, cfg.backbone.weights, cfg.backbone.layers, "cache"))


def test_the_default_configuration_keeps_its_fingerprint_under_exact_decoding():
    """0.1 decoded every JPEG at full size: ``data.decode=exact`` is that, and keeps 0.1's key exactly."""
    want = json.loads((FIXTURE / "default_fingerprint.json").read_text())
    key = _default_key(**{"data.decode": "exact"})
    assert key == want["key"]
    assert fingerprint(key) == want["fingerprint"]


def test_the_new_default_decode_policy_has_its_own_fingerprint():
    """The default ``data.decode=dct`` changes pixels, so its caches are new files (0.1 caches are
    re-extracted under the new default, and still found with ``--set data.decode=exact``)."""
    want = json.loads((FIXTURE / "default_fingerprint.json").read_text())
    key = _default_key()
    assert key["decode"] == {"policy": "dct", "margin": 2}
    assert {k: v for k, v in key.items() if k != "decode"} == want["key"]
    assert fingerprint(key) != want["fingerprint"]


def test_an_array_dataset_keeps_its_0_1_cache_under_the_new_default():
    """Nothing is decoded for array sources (the Fashion-MNIST demo, ``.npz``): the decode policy stays out of
    their key, so their 0.1 caches are found without ``data.decode=exact``."""
    want = json.loads((FIXTURE / "default_fingerprint.json").read_text())
    cfg = load_config(None, None)
    spec = get_spec(cfg.backbone.name)
    digest = weights_digest(spec, cfg.backbone.weights, cfg.backbone.layers, "cache")
    assert fingerprint(feature_key(cfg, spec, digest, decodes=False)) == want["fingerprint"]


def _record_source(cache: Path, source: Path) -> None:
    """Make the 0.1 cache say it was extracted from ``source`` (it recorded the path it was written from),
    keeping its metadata checksum valid, as 0.1 itself would have written it there."""
    import h5py

    from pipeline.cache.h5 import attrs_digest

    with h5py.File(cache, "r+") as f:
        f.attrs["source"] = str(source)
        f.attrs["attrs_sha256"] = attrs_digest(f.attrs)


OLD_CACHE = "tiny-efficientnet_lite0-9b4e57aab9c5.h5"


def _old_overrides(old_tree: Path, source: Path) -> dict:
    return {
        "data.source": str(source),
        "extract.cache_dir": str(old_tree / "cache"),
        "backbone.image_size": "32",
        "extract.progress": "false",
    }


@pytest.mark.parametrize("recorded", ["this source", "a source that is gone"])
def test_an_old_cache_of_this_source_is_found_and_reused_not_re_extracted(old_tree, recorded):
    """A 0.1 cache has no source tag in its name: it is still this source's cache when the source it
    recorded is this one, or no longer exists (a moved folder), and extract records its source once."""
    from pipeline.stages.extract import extract

    source = old_tree / "tiny.npz"
    _record_source(
        old_tree / "cache" / OLD_CACHE, source if recorded == "this source" else old_tree / "gone.npz"
    )
    overrides = _old_overrides(old_tree, source)
    path, _, _ = resolve_cache_path(load_config(None, overrides))
    assert path.is_file() and path.name == OLD_CACHE
    with FeatureCache(path) as c:
        assert c.fingerprint.startswith("9b4e57aab9c5") and c.n_rows == 40 and "source_id" not in c.meta
    result = extract(load_config(None, overrides))
    assert (result.path.name, result.extracted, result.reused) == (OLD_CACHE, 0, 40)
    with FeatureCache(path) as c:  # recorded once: from now on it is matched by its source
        assert c.meta["source_id"] == str(source.resolve()) and c.n_rows == 40
    assert sorted(p.name for p in (old_tree / "cache").glob("*.h5")) == [OLD_CACHE]


def test_an_old_cache_of_another_existing_source_is_never_rebuilt_for_this_one(old_tree):
    """Two sources named alike: the 0.1 cache recorded another ``tiny.npz`` that still exists. This one
    gets a cache of its own (its rows copied by content, nothing extracted); the old file is untouched."""
    from pipeline.stages.extract import extract

    other = old_tree / "elsewhere" / "tiny.npz"
    other.parent.mkdir()
    shutil.copy(old_tree / "tiny.npz", other)
    _record_source(old_tree / "cache" / OLD_CACHE, other)
    before = (old_tree / "cache" / OLD_CACHE).read_bytes()
    result = extract(load_config(None, _old_overrides(old_tree, old_tree / "tiny.npz")))
    assert result.path.name != OLD_CACHE and result.path.name.startswith("tiny-")
    assert (result.extracted, result.reused, result.donated) == (0, 40, 40)
    assert (old_tree / "cache" / OLD_CACHE).read_bytes() == before
    with FeatureCache(result.path) as new, FeatureCache(old_tree / "cache" / OLD_CACHE) as old:
        assert new.ids == old.ids and np.array_equal(new.features(), old.features())


@pytest.mark.parametrize("kind", ["logistic", "keras_linear"])
def test_an_old_run_folder_loads_and_predicts_as_before(old_tree, kind):
    """0.1 runs hold pickles: they load as before, but only when the caller says it trusts them."""
    (run_dir,) = (old_tree / "cache" / "runs").glob(f"*-{kind}-*")
    expected = np.load(FIXTURE / "expected_proba.npz")[run_dir.name]
    with pytest.raises(PickleRefused, match=r"\.joblib: a pickle .*--trust-pickle"):
        load_run(run_dir)
    run = load_run(run_dir, trust_pickle=True)
    with FeatureCache(next((old_tree / "cache").glob("*.h5"))) as c:
        X = c.features()
    np.testing.assert_allclose(run.model.predict_proba(X), expected, rtol=1e-5, atol=1e-6)
    assert run.class_names == ["dark", "light"]


@pytest.mark.parametrize("kind", ["logistic", "keras_linear"])
def test_runs_upgrade_rewrites_an_old_run_as_skops_once(old_tree, kind):
    """``featcache runs upgrade RUN --trust-pickle``: skops files and a fresh manifest, the same
    probabilities, and from then on the run loads without any opt-in; without the flag nothing changes."""
    from conftest import run_cli

    (run_dir,) = (old_tree / "cache" / "runs").glob(f"*-{kind}-*")
    expected = np.load(FIXTURE / "expected_proba.npz")[run_dir.name]
    before = sorted(p.name for p in run_dir.iterdir())
    cache = str(next((old_tree / "cache").glob("*.h5")))
    shown = run_cli("runs", "show", run_dir.name, "--cache", cache)
    assert shown.returncode == 0 and f"featcache runs upgrade {run_dir.name} --trust-pickle" in shown.stdout
    refused = run_cli("runs", "upgrade", str(run_dir))
    assert refused.returncode == 2 and sorted(p.name for p in run_dir.iterdir()) == before
    assert refused.stderr.count("\n") == 1 and "--trust-pickle" in refused.stderr
    done = run_cli("runs", "upgrade", str(run_dir), "--trust-pickle")
    assert done.returncode == 0, done.stderr
    assert not list(run_dir.glob("*.joblib")) and list(run_dir.glob("*.skops"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert not any(name.endswith(".joblib") for name in manifest["files"])
    run = load_run(run_dir)  # no trust needed any more
    with FeatureCache(next((old_tree / "cache").glob("*.h5"))) as c:
        X = c.features()
    np.testing.assert_allclose(run.model.predict_proba(X), expected, rtol=1e-5, atol=1e-6)
    assert "runs upgrade" not in run_cli("runs", "show", run_dir.name, "--cache", cache).stdout
    again = run_cli("runs", "upgrade", str(run_dir), "--trust-pickle")
    assert again.returncode == 2 and "nothing to upgrade" in again.stderr


def test_todays_cache_is_found_by_its_settings(today_tree):
    overrides = {
        "data.source": str(FIXTURE / "tiny.npz"),
        "extract.cache_dir": str(today_tree / "cache"),
        "backbone.image_size": "32",
        "backbone.layers": TODAY_LAYER,
    }
    path, _, _ = resolve_cache_path(load_config(None, overrides))
    assert path.is_file() and path.parent == today_tree / "cache"


def test_todays_run_folder_loads_and_predicts_as_it_did(today_tree):
    """A run written by today's code: skops (no pickle, no opt-in), its metrics read through the typed view."""
    (run_dir,) = (today_tree / "cache" / "runs").glob("*-logistic-*")
    expected = np.load(TODAY / "expected_proba.npz")[run_dir.name]
    run = load_run(run_dir)
    with FeatureCache(next((today_tree / "cache").glob("*.h5"))) as c:
        X = c.features(TODAY_LAYER)
        fingerprint_ = c.fingerprint
    np.testing.assert_allclose(run.model.predict_proba(X), expected, rtol=1e-5, atol=1e-6)
    m = run.metrics
    assert run.class_names == m.class_names == ["dark", "light"]
    assert (m.kind, m.head, m.layer, m.n_features) == ("train", "logistic", TODAY_LAYER, 16)
    assert m.cache_fingerprint == fingerprint_ and m.calibrated
    assert m.val_accuracy == m["val"]["accuracy"] and m["transforms"] == ["standardize"]


def test_run_folders_of_0_1_and_today_are_listed_and_found_by_id_prefix(old_tree, today_tree):
    from conftest import run_cli

    from pipeline.utils.runs import find_run, list_runs, read_metrics

    for tree in (old_tree, today_tree):
        root = tree / "cache" / "runs"
        rows = list_runs(root)
        assert rows and all(r["readable"] and r["kind"] == "train" for r in rows)
        for row in rows:
            run_dir = find_run(row["id"][:-2], [root])
            assert run_dir == root / row["id"]
            m = read_metrics(run_dir)
            assert m.class_names == ["dark", "light"] and m.val_accuracy == row["val_accuracy"]
            assert m.cache_fingerprint == row["fingerprint"] and m.cache_path is not None
        cache = next((tree / "cache").glob("*.h5"))
        r = run_cli("runs", "show", rows[0]["id"][:-2], "--cache", str(cache), cwd=tree)
        assert r.returncode == 0, r.stderr
        assert rows[0]["id"] in r.stdout and "class (test)" in r.stdout
