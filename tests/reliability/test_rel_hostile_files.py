"""Files a stranger hands over never run code: every hostile or broken model file, run folder, cache or
shard is one line on stderr and exit code 2 (or a clean success), and a payload's marker file never appears.

The payloads are real: a pickle whose ``__reduce__`` opens a marker file for writing, a ``.keras`` file with a
Python ``Lambda`` that would touch it, a ``.keras`` naming a class of a module sitting in the working folder
(importing it would touch it), skops files with an untrusted type, a tar with ``../`` and absolute member
names. Commands run as real ``featcache`` processes.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image

FIXTURE = REPO / "tests" / "fixtures" / "v0.1"


class _Payload:
    """Unpickling this opens ``marker`` for writing: the sign that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line_refusal(proc, marker: Path | None = None) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], err[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, err[-2000:]
    lines = [ln for ln in err.splitlines() if not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("featcache: error: "), err[-2000:]
    assert marker is None or not marker.exists(), "the file's code ran"
    return lines[0]


@pytest.fixture
def photo(tmp_path) -> Path:
    p = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(p)
    return p


@pytest.fixture
def old_runs(tmp_path) -> Path:
    """The committed 0.1 tree (a tiny cache and two runs), copied so the tests can tamper with it."""
    shutil.copytree(FIXTURE, tmp_path / "v0.1")
    return tmp_path / "v0.1" / "cache" / "runs"


def _run_of(runs: Path, kind: str) -> Path:
    return next(runs.glob(f"*-{kind}-*"))


def _rewrite_manifest(run_dir: Path) -> None:
    """What an attacker does: a manifest that lists the planted files with their true sha256."""
    from pipeline.utils.runs import write_manifest

    old = json.loads((run_dir / "manifest.json").read_text())
    write_manifest(run_dir, old["kind"], old["model_files"])


def _plant_pickle(run_dir: Path, name: str, marker: Path) -> None:
    import joblib

    joblib.dump(_Payload(marker), run_dir / name)
    _rewrite_manifest(run_dir)


# ------------------------------------------------------------------------------------------ pickles


@pytest.mark.parametrize("command", ["predict", "export", "finetune"])
def test_a_pickle_run_with_a_valid_manifest_is_refused_by_every_command(old_runs, tmp_path, photo, command):
    run_dir = _run_of(old_runs, "logistic")
    marker = tmp_path / "pwned"
    _plant_pickle(run_dir, "model.joblib", marker)
    args = {
        "predict": ["predict", "--model", str(run_dir), str(photo)],
        "export": ["export", "--run", str(run_dir), "--format", "keras"],
        "finetune": ["finetune", "--run", str(run_dir), "--set", f"train.runs_dir={tmp_path / 'ft'}"],
    }[command]
    line = _one_line_refusal(run_cli(*args, cwd=tmp_path), marker)
    assert str(run_dir / "model.joblib") in line and "--trust-pickle" in line and "runs upgrade" in line


def test_a_transforms_pickle_beside_a_keras_head_is_refused(old_runs, tmp_path, photo):
    run_dir = _run_of(old_runs, "keras_linear")
    marker = tmp_path / "pwned"
    _plant_pickle(run_dir, "transforms.joblib", marker)
    line = _one_line_refusal(run_cli("predict", "--model", str(run_dir), str(photo), cwd=tmp_path), marker)
    assert "transforms.joblib: a pickle" in line
    upgrade = run_cli("runs", "upgrade", str(run_dir), cwd=tmp_path)  # no opt-in: refused, nothing loaded
    _one_line_refusal(upgrade, marker)


def test_the_python_api_refuses_pickles_unless_asked(old_runs, tmp_path):
    from pipeline.heads.persist import PickleRefused, load_run

    run_dir = _run_of(old_runs, "logistic")
    marker = tmp_path / "pwned"
    _plant_pickle(run_dir, "model.joblib", marker)
    with pytest.raises(PickleRefused, match="trust_pickle=True"):
        load_run(run_dir)
    assert not marker.exists()


# --------------------------------------------------------------------------- skops, kinds, manifests


def _sklearn_run(run_dir: Path, obj, kind: str = "sklearn", files=("model.skops",)) -> Path:
    import skops.io as sio

    from pipeline.utils.runs import write_manifest

    run_dir.mkdir(parents=True)
    sio.dump(obj, run_dir / "model.skops")
    shutil.copy(next(FIXTURE.glob("cache/runs/*-logistic-*/metrics.json")), run_dir / "metrics.json")
    write_manifest(run_dir, kind, list(files))
    return run_dir


def _untrusted_pipeline():
    import os

    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    return Pipeline([("f", FunctionTransformer(os.system))])


HOSTILE_RUNS = {
    "skops-untrusted-type": (
        lambda: _untrusted_pipeline(),
        "sklearn",
        ("model.skops",),
        "refusing to load types",
    ),
    "skops-not-a-model": (lambda: 5, "sklearn", ("model.skops",), "not a fitted featcache classifier"),
    "unknown-kind": (lambda: 5, "banana", ("model.skops",), "is not a featcache model"),
    "keras-kind-without-head": (lambda: 5, "keras", ("model.skops",), "is not a featcache model"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RUNS))
def test_hostile_run_folders_are_one_line(tmp_path, photo, case):
    make, kind, files, message = HOSTILE_RUNS[case]
    run_dir = _sklearn_run(tmp_path / "run", make(), kind, files)
    line = _one_line_refusal(run_cli("predict", "--model", str(run_dir), str(photo), cwd=tmp_path))
    assert message in line


def test_missing_truncated_and_garbled_model_files_are_one_line(old_runs, tmp_path, photo):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    X, y = np.random.default_rng(0).normal(size=(20, 4)), np.arange(20) % 2
    good = _sklearn_run(tmp_path / "good", Pipeline([("head", LogisticRegression().fit(X, y))]))
    cases = {}
    for name, damage in {
        "missing": lambda p: p.unlink(),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
        "garbled-with-manifest": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 300),
    }.items():
        run_dir = tmp_path / name
        shutil.copytree(good, run_dir)
        damage(run_dir / "model.skops")
        if name == "garbled-with-manifest":
            _rewrite_manifest(run_dir)
        cases[name] = _one_line_refusal(run_cli("predict", "--model", str(run_dir), str(photo)))
    assert "missing" in cases["missing"] and "truncated" in cases["truncated"]
    assert "cannot load the model" in cases["garbled-with-manifest"]
    outside = tmp_path / "outside"
    shutil.copytree(good, outside)
    manifest = json.loads((outside / "manifest.json").read_text())
    manifest["files"]["../good/model.skops"] = manifest["files"].pop("model.skops")
    (outside / "manifest.json").write_text(json.dumps(manifest))
    assert "not a file of this run" in _one_line_refusal(
        run_cli("predict", "--model", str(outside), str(photo))
    )
    metrics = tmp_path / "bad-metrics"
    shutil.copytree(good, metrics)
    (metrics / "metrics.json").write_text('["not", "a", "run"]')
    _rewrite_manifest(metrics)
    assert "metrics.json" in _one_line_refusal(run_cli("predict", "--model", str(metrics), str(photo)))


# ------------------------------------------------------------------------- .keras, SavedModel, .tflite


def _tiny_keras(path: Path, *layers) -> Path:
    import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), *layers, keras.layers.GlobalAveragePooling2D()])
    model.save(path)
    return path


def test_a_keras_file_with_a_lambda_is_refused_and_never_called(tmp_path, photo):
    import keras

    marker = tmp_path / "pwned"
    evil = _tiny_keras(
        tmp_path / "evil.keras",
        keras.layers.Lambda(lambda x, m=str(marker): (__import__("pathlib").Path(m).touch(), x)[1]),
    )
    marker.unlink()  # building the model in this test called the lambda once
    line = _one_line_refusal(run_cli("predict", "--model", str(evil), str(photo), cwd=tmp_path), marker)
    assert "evil.keras" in line


def test_a_keras_file_naming_a_foreign_module_never_imports_it(tmp_path, photo):
    """A ``.keras`` config naming ``evilmod.Evil``, with ``evilmod.py`` in the working folder."""
    marker = tmp_path / "pwned"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w')\nclass Evil: pass\n")
    good = _tiny_keras(tmp_path / "good.keras")
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                cfg = json.loads(data)
                cfg["config"]["layers"][-1].update(module="evilmod", class_name="Evil", registered_name=None)
                data = json.dumps(cfg).encode()
            dst.writestr(item, data)
    _one_line_refusal(run_cli("predict", "--model", str(evil), str(photo), cwd=tmp_path), marker)


def test_broken_savedmodel_tflite_and_export_json_are_one_line(tmp_path, photo):
    sm = tmp_path / "sm"
    sm.mkdir()
    (sm / "saved_model.pb").write_bytes(b"\x08\x01 not a protobuf at all")
    (sm / "export.json").write_text(json.dumps({"image_size": 8, "class_names": ["a", "b"]}))
    assert "sm" in _one_line_refusal(run_cli("predict", "--model", str(sm), str(photo)))
    (sm / "export.json").write_text("{not json")
    assert "export.json" in _one_line_refusal(run_cli("predict", "--model", str(sm), str(photo)))
    (sm / "export.json").write_text(json.dumps({"image_size": 8}))  # no class names
    assert "export.json" in _one_line_refusal(run_cli("predict", "--model", str(sm), str(photo)))
    (sm / "export.json").write_text(json.dumps({"image_size": "huge", "class_names": "ab"}))
    assert "export.json" in _one_line_refusal(run_cli("predict", "--model", str(sm), str(photo)))

    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"TFL3" + bytes(range(256)) * 4)
    assert "fake.tflite" in _one_line_refusal(run_cli("predict", "--model", str(fake), str(photo)))
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    assert "empty.keras" in _one_line_refusal(run_cli("predict", "--model", str(empty), str(photo)))


def test_an_export_json_beside_a_real_tflite_that_is_not_json_is_one_line(tmp_path, photo):
    import tensorflow as tf

    from pipeline.features.tflite import TFLiteRunner

    model = tf.keras.Sequential(
        [tf.keras.Input((8, 8, 3)), tf.keras.layers.GlobalAveragePooling2D(), tf.keras.layers.Dense(2)]
    )
    path = tmp_path / "model.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    assert TFLiteRunner(path).n_outputs == 2
    (tmp_path / "export.json").write_text("[1, 2")
    assert "export.json" in _one_line_refusal(run_cli("predict", "--model", str(path), str(photo)))
    (tmp_path / "export.json").write_text(json.dumps({"class_names": {"a": 1}, "resize": 7}))
    assert "export.json" in _one_line_refusal(run_cli("predict", "--model", str(path), str(photo)))


# --------------------------------------------------------------------------------- caches and shards


CRAFTED_ATTRS = {
    "wrong-types": {"fingerprint": 12345, "class_names": 7, "layers": 3.5, "image_size": "big"},
    "huge-strings": {"backbone": "b" * 2_000_000, "dataset": "<script>" * 100_000},
    "nonsense-json": {"class_names": "{[", "key": "\xff\ufffe", "complete": "yes"},
}


@pytest.mark.parametrize("case", sorted(CRAFTED_ATTRS))
def test_a_cache_with_crafted_attributes_is_a_clean_exit(tmp_path, case):
    import h5py

    root = tmp_path / "cache"
    shutil.copytree(FIXTURE / "cache", root)
    (h5,) = root.glob("*.h5")
    with h5py.File(h5, "r+") as f:
        for k, v in CRAFTED_ATTRS[case].items():
            f.attrs[k] = v
    for args in (
        ["cache", "ls", "--cache-dir", str(root)],
        ["cache", "info", str(h5)],
        ["train", "--cache", str(h5), "--set", f"train.runs_dir={tmp_path / 'runs'}"],
        ["runs", "ls", "--cache", str(h5)],
    ):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode in (0, 2), (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert len(proc.stdout) + len(proc.stderr) < 50_000, (args, "a crafted attribute was dumped whole")
        if proc.returncode == 2:
            assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr[-2000:])


def test_tar_members_named_outside_the_folder_write_nothing_outside(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "escaped.png"
    absolute = tmp_path / "absolute.png"
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buf, format="PNG")
    with tarfile.open(work / "shard.tar", "w") as tar:
        for name, label in (
            ("../escaped.png", b"a"),
            (str(absolute), b"b"),
            ("ok1.png", b"a"),
            ("ok2.png", b"b"),
        ):
            for member, data in ((name, buf.getvalue()), (name.rsplit(".", 1)[0] + ".cls", label)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(
        "extract", "--data", str(work / "shard.tar"), "--cache-dir", str(work / "cache"),
        "--image-size", "32", "--quiet", cwd=work,
    )  # fmt: skip
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not outside.exists() and not absolute.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    written = [p for p in (work / "cache").rglob("*") if p.is_file()]
    assert written and all(p.resolve().is_relative_to((work / "cache").resolve()) for p in written)


# ------------------------------------------------------------------------ names shown in a browser


HTML_CLASSES = ("<img src=x onerror=alert(1)>", "a&b<i>")


def test_html_in_class_and_file_names_is_escaped_in_the_report(tmp_path):
    from html.parser import HTMLParser

    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for k, cls in enumerate(HTML_CLASSES):
        (photos / cls).mkdir(parents=True)
        for i in range(30):  # the classes overlap, so the report shows misclassified images by name
            pixels = np.clip(rng.normal(110 + 10 * k, 60, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(photos / cls / f"<script>alert({i})<!--{i}.png")
    common = ["--data", str(photos), "--cache-dir", str(tmp_path / "cache"), "--image-size", "32", "--quiet"]
    for args in (
        ["extract", *common],
        ["train", *common],
        ["report", *common, "--out", str(tmp_path / "r.html")],
    ):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    html = (tmp_path / "r.html").read_text(encoding="utf-8")

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: list[tuple[str, dict]] = []
            self.text = ""

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, dict(attrs)))

        def handle_data(self, data):
            self.text += data

    page = Tags()
    page.feed(html)
    assert not any("onerror" in attrs for _, attrs in page.found)
    assert [t for t, _ in page.found].count("script") == html.count("<script>") <= 1  # the report's own
    assert HTML_CLASSES[0] in page.text and "a&b<i>" in page.text  # shown as text, escaped
    assert "a&amp;b&lt;i&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;script&gt;alert(" in html  # the misclassified images' file names


def test_hostile_run_folders_in_the_runs_folder_do_not_break_listing_or_the_report(old_runs, tmp_path):
    """``runs ls``, ``runs show`` and ``report`` read JSON only, never model files: odd JSON is skipped
    or shown as text, never a traceback."""
    cache = next((old_runs.parent).glob("*.h5"))
    junk = {
        "list-metrics": ("metrics.json", "[1, 2, 3]"),
        "string-metrics": ("metrics.json", '"hello"'),
        "typed-metrics": ("metrics.json", '{"val_accuracy": "high", "class_names": 5, "head": [1]}'),
        "bad-manifest": ("manifest.json", '{"format": 7, "files": []}'),
    }
    for name, (file, text) in junk.items():
        d = old_runs / f"20990101-000000-{name}-0000"
        shutil.copytree(_run_of(old_runs, "logistic"), d)
        (d / file).write_text(text)
        _rewrite_manifest(d) if file != "manifest.json" else None
    for args in (
        ["runs", "ls", "--cache", str(cache)],
        ["runs", "ls", "--cache", str(cache), "--json"],
        *[["runs", "show", f"20990101-000000-{n}", "--cache", str(cache)] for n in junk],
        ["report", "--cache", str(cache), "--out", str(tmp_path / "r.html")],
    ):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        if proc.returncode == 2:
            assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
