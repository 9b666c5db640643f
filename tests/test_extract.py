"""Stage 1: the feature cache holds exactly what the backbone outputs, and is incremental and resumable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, run_cli, small_config, write_photo_folder

from pipeline.cache.quarantine import quarantine_path
from pipeline.cache.store import FeatureCache, partial_dir
from pipeline.stages.extract import extract
from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError


def _extract(cache_dir, source, **extra):
    return extract(load_config(None, small_config(cache_dir, source, **extra)))


def test_cached_features_equal_plain_keras_predict(photo_folder, tmp_path):
    """The cache equals ``keras.Model.predict`` of the same backbone on the same decoded, resized images."""
    import keras

    from pipeline.data.decode import decode_image
    from pipeline.data.preprocess import resize_images
    from pipeline.features.backbones.efficientnet_lite import build_efficientnet_lite0, preprocess

    r = _extract(tmp_path / "c", photo_folder, **{"backbone.image_size": 224, "extract.batch_size": 7})
    with FeatureCache(r.path) as c:
        cached, keys = c.features(), c.keys
    base = build_efficientnet_lite0(include_top=False, weights="imagenet", input_shape=(224, 224, 3))
    reference = keras.Sequential([keras.Input((224, 224, 3)), base, keras.layers.GlobalAveragePooling2D()])
    images = np.stack([resize_images(decode_image(photo_folder / k), 224).numpy() for k in keys])
    expected = reference.predict(preprocess(images), batch_size=5, verbose=0)
    assert cached.shape == (20, 1280) and cached.dtype == np.float32
    diff = float(np.abs(cached - expected).max())
    print(f"max |cache - keras predict| = {diff:.2e}")
    assert diff <= 1e-5


def test_cache_is_self_describing_plain_h5py(photo_folder, tmp_path):
    r = _extract(tmp_path / "c", photo_folder)
    with h5py.File(r.path, "r") as f:
        assert f["features/top_activation"].shape == (20, 1280)
        assert f["features/top_activation"].chunks is not None
        assert sorted(x.decode() for x in f["class_names"][()]) == ["china", "flower"]
        assert len(f["labels"]) == len(f["keys"]) == len(f["ids"]) == len(f["split"]) == 20
        for attr in (
            "backbone",
            "weights_digest",
            "layers",
            "pooling",
            "image_size",
            "resize",
            "versions",
            "fingerprint",
        ):
            assert attr in f.attrs, attr
        assert (
            f.attrs["complete"]
            and f.attrs["backbone"] == "efficientnet_lite0"
            and f.attrs["image_size"] == 64
        )
        assert json.loads(f.attrs["versions"])["tensorflow"]


def test_noop_rerun_does_no_backbone_work_and_imports_no_tensorflow(photo_folder, tmp_path):
    cache = tmp_path / "c"
    first = _extract(cache, photo_folder)
    assert first.extracted == 20 and first.batches > 0
    before = first.path.stat()
    digest = hashlib.sha256(first.path.read_bytes()).hexdigest()
    code = (
        "import sys, json; from pipeline.stages.extract import extract; from pipeline.utils.config import load_config;"
        f"r = extract(load_config(None, json.loads({json.dumps(json.dumps(small_config(cache, photo_folder)))})));"
        "print(json.dumps([r.batches, r.extracted, r.reused, 'tensorflow' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    batches, extracted, reused, tf_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert (batches, extracted, reused) == (0, 0, 20)
    assert not tf_imported
    # not rewritten: the same file (inode) with the same bytes; only its time is bumped, which is how the
    # later stages know it is the cache just asked for (cache.locate)
    after = first.path.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == digest
    assert after.st_mtime_ns >= before.st_mtime_ns


def test_incremental_add_and_remove(photo_folder, tmp_path):
    cache = tmp_path / "c"
    r1 = _extract(cache, photo_folder)
    with FeatureCache(r1.path) as c:
        before = dict(zip(c.keys, c.features(), strict=True))
        split_before = dict(zip(c.keys, c.split, strict=True))
    added = write_photo_folder(photo_folder, per_class=2, seed=7, start=100)
    removed = sorted(photo_folder.glob("china/*.jpg"))[:3]
    for p in removed:
        p.unlink()
    r2 = _extract(cache, photo_folder)
    assert r2.extracted == len(added) == 4
    assert r2.removed == 3 and r2.rows == 20 + 4 - 3
    assert r2.path == r1.path
    with FeatureCache(r2.path) as c:
        after = dict(zip(c.keys, c.features(), strict=True))
        split_after = dict(zip(c.keys, c.split, strict=True))
    for key, vec in before.items():
        if key in after:
            np.testing.assert_array_equal(after[key], vec)  # reused rows are bit-identical
            assert split_after[key] == split_before[key]
    assert not any(p.relative_to(photo_folder).as_posix() in after for p in removed)


def test_moving_the_folder_reuses_everything_and_keeps_splits(photo_folder, tmp_path):
    cache = tmp_path / "c"
    r1 = _extract(cache, photo_folder)
    with FeatureCache(r1.path) as c:
        split1 = dict(zip(c.keys, c.split, strict=True))
    moved = tmp_path / "elsewhere" / "photos"
    shutil.move(str(photo_folder), moved)
    r2 = _extract(cache, moved)
    assert r2.extracted == 0 and r2.reused == 20
    with FeatureCache(r2.path) as c:
        assert dict(zip(c.keys, c.split, strict=True)) == split1


def test_feature_changing_settings_never_serve_stale_rows(photo_folder, tmp_path):
    cache = tmp_path / "c"
    base = _extract(cache, photo_folder)
    for change in (
        {"backbone.image_size": 96},
        {"backbone.resize": "crop"},
        {"backbone.pooling": "max"},
        {"backbone.weights": "none"},
    ):
        r = _extract(cache, photo_folder, **change)
        assert r.path != base.path, change
        assert r.extracted == 20 and r.reused == 0, change
    with (
        FeatureCache(base.path) as a,
        FeatureCache(_extract(cache, photo_folder, **{"backbone.pooling": "max"}).path) as b,
    ):
        assert not np.allclose(a.features(), b.features())


def test_changed_file_content_is_reextracted(photo_folder, tmp_path):
    cache = tmp_path / "c"
    r1 = _extract(cache, photo_folder)
    target = sorted(photo_folder.glob("flower/*.png"))[0]
    other = sorted(photo_folder.glob("china/*.png"))[0]
    shutil.copy(other, target)  # same name, different pixels
    os.utime(target, ns=(time.time_ns(), time.time_ns()))
    r2 = _extract(cache, photo_folder)
    assert r2.extracted == 0 or r2.extracted == 1  # identical content to ``other`` may be served from its row
    with FeatureCache(r2.path) as c:
        feats = dict(zip(c.keys, c.features(), strict=True))
    key_t, key_o = (p.relative_to(photo_folder).as_posix() for p in (target, other))
    np.testing.assert_allclose(feats[key_t], feats[key_o], atol=1e-5)
    assert r1.path == r2.path


def test_several_layers_in_one_pass_and_named_cut(tmp_path, photo_folder):
    r = _extract(
        tmp_path / "c", photo_folder, **{"backbone.layers": ["block6d_add", "top_activation", "predictions"]}
    )
    with FeatureCache(r.path) as c:
        assert c.layers == sorted(["block6d_add", "top_activation", "predictions"]) or set(c.layers) == {
            "block6d_add",
            "top_activation",
            "predictions",
        }
        assert c.dataset("block6d_add").shape[1] == 192
        assert c.dataset("predictions").shape[1] == 1000
        assert c.dataset("top_activation").shape[1] == 1280


def test_keras_applications_backbone_and_offline_message(tmp_path, photo_folder):
    r = _extract(
        tmp_path / "c",
        photo_folder,
        **{"backbone.name": "MobileNetV2", "backbone.weights": "none", "backbone.image_size": 96},
    )
    with FeatureCache(r.path) as c:
        assert c.meta["backbone"] == "mobilenet_v2" and c.meta["preprocess"] == "tf"
        assert c.dataset().shape == (20, 1280)
    res = run_cli(
        "extract",
        "--data",
        str(photo_folder),
        "--backbone",
        "vgg16",
        "--cache-dir",
        str(tmp_path / "v"),
        "--quiet",
    )
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "vgg16" in err[0] and "--weights" in err[0], res.stderr


def test_resume_after_kill_9_equals_uninterrupted_run(tmp_path):
    """A real ``featcache extract`` subprocess, SIGKILLed mid-run, resumes and ends equal to a clean run."""
    npz = tmp_path / "digits.npz"
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(npz, images=(d.images * 16).clip(0, 255).astype(np.uint8), labels=d.target)
    # one engine for every row: ``auto`` decides by a speed measured at run time (and not for a small
    # remainder), and the float engines agree only within 1e-4, coarser than this test's 1e-5
    args = [
        "--data",
        str(npz),
        "--image-size",
        "96",
        "--batch-size",
        "8",
        "--quiet",
        "--set",
        "extract.engine=tensorflow",
    ]
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "extract", *args, "--cache-dir", str(killed_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    parts = []
    while time.time() < deadline:
        parts = list(killed_dir.glob("*.partial/part-*.npz"))
        if len(parts) >= 6 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(parts) >= 6, "the run ended before it could be killed mid-way"
    assert not list(killed_dir.glob("*.h5")), "no complete cache may exist after a kill mid-extraction"
    kept = len(list(killed_dir.glob("*.partial/part-*.npz")))

    resumed = run_cli("extract", *args, "--cache-dir", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr
    reused = int(resumed.stdout.split(" reused")[0].split("·")[-1])
    assert reused >= kept * 8 - 8  # every whole part was kept (duplicate images share one row)
    clean = run_cli("extract", *args, "--cache-dir", str(clean_dir))
    assert clean.returncode == 0, clean.stderr
    (a_path,) = killed_dir.glob("*.h5")
    (b_path,) = clean_dir.glob("*.h5")
    assert a_path.name == b_path.name
    with FeatureCache(a_path) as a, FeatureCache(b_path) as b:
        assert a.keys == b.keys and a.ids == b.ids and len(a.keys) == 1797
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.split, b.split)
        np.testing.assert_allclose(a.features(), b.features(), atol=1e-5, rtol=0)
    assert not partial_dir(a_path).exists()


def test_bad_input_zoo_is_skipped_and_quarantined(tmp_path, photo_folder):
    from zoo import OK, make_zoo

    zoo_dir = photo_folder / "zoo"
    zoo_dir.mkdir()
    expected = make_zoo(zoo_dir)
    r = _extract(tmp_path / "c", photo_folder)
    bad = {k.split("/", 1)[1]: why for k, why in r.problems}
    images_expected_bad = {
        n
        for n, outcome in expected.items()
        if outcome != OK
        and not n.startswith(".")
        and Path(n).suffix.lower() in (".jpg", ".png", ".webp")
        and not (zoo_dir / n).is_dir()  # a folder named x.jpg is walked like any sub-folder
    }
    assert images_expected_bad <= set(bad) | {n for n in images_expected_bad if n.startswith("._")}, bad
    for name, why in bad.items():
        assert expected.get(name, "") in why or expected.get(name) is None
    assert r.skipped == len(r.problems) > 0
    q = quarantine_path(r.path).read_text()
    assert "bomb.png" in q and "empty.jpg" in q
    with FeatureCache(r.path) as c:
        ok_names = {n for n, outcome in expected.items() if outcome == OK and not n.startswith(".")}
        cached = {k.split("/", 1)[1] for k in c.keys if k.startswith("zoo/")}
        assert {
            n
            for n in ok_names
            if Path(n).suffix.lower() in (".jpg", ".png", ".gif", ".bmp", ".webp", ".tiff")
        } <= cached | {n for n in ok_names if "\\x" in n or "\udce9" in n or not n.isascii()}
    # the rerun skips the known-bad files without decoding them again, and still reports them
    again = _extract(tmp_path / "c", photo_folder)
    assert again.extracted == 0 and again.skipped == r.skipped


def test_on_error_fail_names_the_file(tmp_path, photo_folder):
    (photo_folder / "china" / "broken.jpg").write_bytes(b"")
    res = run_cli(
        "extract",
        "--data",
        str(photo_folder),
        "--on-error",
        "fail",
        "--image-size",
        "64",
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "broken.jpg" in res.stderr and "empty" in res.stderr


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        (None, ["--backbone", "resnet5O"], "unknown backbone"),
        (None, ["--data", "/no/such/folder"], "not found"),
        ("empty_class", [], "class folder has no images"),
        ("single_class", [], "at least 2 classes"),
        (None, ["--set", "data.val_fraction=2"], "data.val_fraction"),
        (None, ["--set", "backbone.colour=red"], "backbone.colour"),
        (None, ["--pooling", "mean"], "--pooling"),
        (None, ["--batch-size", "0"], "extract.batch_size"),
        ("bad_toml", [], "not valid TOML"),
        ("unknown_key_toml", [], "data.sauce"),
        (None, ["--weights", "/no/such/weights.h5"], "file not found"),
        (None, ["--layer", "no_such_layer"], "no_such_layer"),
    ],
)
def test_config_errors_are_one_line_exit_2(tmp_path, photo_folder, setup, args, needle):
    extra = []
    if setup == "empty_class":
        (photo_folder / "empty").mkdir()
    elif setup == "single_class":
        shutil.rmtree(photo_folder / "flower")
    elif setup in ("bad_toml", "unknown_key_toml"):
        cfg = tmp_path / "bad.toml"
        cfg.write_text("[data\nsource=" if setup == "bad_toml" else '[data]\nsauce = "x"\n')
        extra = ["--config", str(cfg)]
    res = run_cli(
        "extract",
        "--data",
        str(photo_folder),
        "--image-size",
        "64",
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
        *extra,
        *args,
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_damaged_cache_is_reported_and_rebuilt_on_request(tmp_path, photo_folder):
    r = _extract(tmp_path / "c", photo_folder)
    data = r.path.read_bytes()
    r.path.write_bytes(data[: len(data) // 3])
    res = run_cli(
        "extract",
        "--data",
        str(photo_folder),
        "--image-size",
        "64",
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
    )
    assert res.returncode == 2 and "--rebuild" in res.stderr and str(r.path.name) in res.stderr
    res = run_cli(
        "extract",
        "--data",
        str(photo_folder),
        "--image-size",
        "64",
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
        "--rebuild",
    )
    assert res.returncode == 0, res.stderr
    with FeatureCache(r.path) as c:
        assert c.n_rows == 20


def test_second_run_on_a_locked_cache_gets_a_clear_message(tmp_path, photo_folder):
    from filelock import FileLock

    r = _extract(tmp_path / "c", photo_folder)
    with FileLock(str(r.path) + ".lock"):
        res = run_cli(
            "extract",
            "--data",
            str(photo_folder),
            "--image-size",
            "64",
            "--cache-dir",
            str(tmp_path / "c"),
            "--quiet",
            "--set",
            "extract.lock_timeout=0",
        )
    assert res.returncode == 2 and "another featcache run" in res.stderr


def test_csv_and_npz_sources(tmp_path, photo_folder):
    rows = ["path,label"] + [
        f"{p.relative_to(photo_folder).as_posix()},{p.parent.name}" for p in sorted(photo_folder.rglob("*.*"))
    ]
    (photo_folder / "list.csv").write_text("\n".join(rows) + "\n")
    r = _extract(tmp_path / "c", photo_folder / "list.csv")
    assert r.rows == 20
    imgs = np.random.default_rng(0).integers(0, 255, (12, 40, 30, 3), dtype=np.uint8)
    np.savez(tmp_path / "arr.npz", images=imgs, labels=np.array(["a", "b"] * 6))
    r2 = _extract(tmp_path / "c", tmp_path / "arr.npz")
    with FeatureCache(r2.path) as c:
        assert c.class_names == ["a", "b"] and c.n_rows == 12


def test_fashion_mnist_builtin_demo_and_stable_splits():
    from pipeline.data.sources import load_dataset
    from pipeline.utils.config import DataConfig

    ds = load_dataset(DataConfig())
    assert len(ds.samples) == 70000 and ds.arrays.shape == (70000, 28, 28) and len(ds.class_names) == 10
    assert sum(s.split == "test" for s in ds.samples) == 10000
    small = load_dataset(DataConfig(limit=500))
    bigger = load_dataset(DataConfig(limit=800))
    assert {s.key for s in small.samples} <= {s.key for s in bigger.samples}


def test_python_api_rejects_unknown_override(tmp_path):
    with pytest.raises(FeatcacheError, match="data.sauce"):
        extract(None, data__sauce="x")


def test_a_feature_model_built_from_other_settings_is_refused(tmp_path, photo_folder):
    """``extract(feature_model=)`` writes only a model built from this config's [backbone] and precision:
    another's rows would be stored under this config's fingerprint."""
    from pipeline.features.backbones.build import build_feature_model
    from pipeline.utils.config import BackboneConfig

    cfg = load_config(None, small_config(tmp_path / "c", photo_folder, **{"backbone.image_size": 32}))
    same = build_feature_model(BackboneConfig(image_size=32))
    done = extract(cfg, feature_model=same)
    assert done.extracted == 20
    with FeatureCache(done.path) as c:
        assert c.layers == ["top_activation"]
    others = {
        "image_size": (BackboneConfig(image_size=48), "float32"),
        "weights": (BackboneConfig(image_size=32, weights="none"), "float32"),
        "pooling": (BackboneConfig(image_size=32, pooling="max"), "float32"),
        "layers": (BackboneConfig(image_size=32, layers=["block6d_add"]), "float32"),
        "precision": (BackboneConfig(image_size=32), "mixed_float16"),
        "name": (BackboneConfig(name="mobilenet_v2", weights="none", image_size=32), "float32"),
    }
    for key, (backbone, precision) in others.items():
        model = build_feature_model(backbone, precision)
        with pytest.raises(FeatcacheError, match=f"built with {key} ") as e:
            extract(cfg, rebuild=True, feature_model=model)
        assert "\n" not in str(e.value)
    # the default layer asked by name is the same model
    named = load_config(
        None,
        small_config(
            tmp_path / "c", photo_folder, **{"backbone.image_size": 32, "backbone.layers": ["top_activation"]}
        ),
    )
    assert extract(named, feature_model=same).path.exists()
