"""Quiet, honest output: the Python API prints none of TensorFlow's start-up, CUDA-probing or retracing lines
(nor urllib3's SOCKS warning), and extract's summary says where the backbone ran and how the rows split."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import REPO, run_cli, small_config, write_photo_folder

#: what must never reach a user of the API: TensorFlow's native start-up and CUDA probing, retracing
#: warnings, urllib3's SOCKS warning
NOISE = ("cuInit", "absl::InitializeLog", "oneDNN", "cuda drivers", "retracing", "DependencyWarning", "SOCKS")


def _python(script: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python, as a user runs one: a SOCKS proxy configured, TF_CPP_MIN_LOG_LEVEL unset."""
    full = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    full.update({"ALL_PROXY": "socks5://127.0.0.1:9", "all_proxy": "socks5://127.0.0.1:9", **env})
    full["PYTHONPATH"] = str(REPO)
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=600
    )


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


def test_the_python_api_extracts_trains_and_predicts_without_tensorflow_noise(tmp_path):
    write_photo_folder(tmp_path / "photos", per_class=8)
    keys = {k.replace(".", "__"): v for k, v in small_config(tmp_path / "cache", tmp_path / "photos").items()}
    r = _python(
        f"""
        import pipeline
        keys = {keys!r}
        done = pipeline.extract(**keys)
        run = pipeline.Run(pipeline.train(**keys))
        for n in (1, 3, 2):  # several batch sizes through the same backbone
            got = run.predict(sorted(str(p) for p in __import__("pathlib").Path("photos").rglob("*.*"))[:n])
            assert len(got) == n
        print("device", done.device, "splits", sum(done.splits.values()))
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device CPU splits 16" in r.stdout, r.stdout
    assert not _noise(r.stderr), r.stderr[-3000:]


def test_each_keras_model_is_traced_once_whatever_its_batch_sizes(tmp_path):
    """featcache builds one traced function per model (engines, fine-tuning and export checks, predict): eight
    models, three batch sizes each, used to print TensorFlow's "triggered tf.function retracing" warning."""
    r = _python(
        """
        import numpy as np
        import pipeline
        import keras
        from pipeline.features.compiled import compiled

        rng = np.random.default_rng(0)
        for i in range(8):
            m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.GlobalAveragePooling2D()])
            for n in (4, 1, 3):
                x = rng.random((n, 8, 8, 3))  # float64: cast to the model's float32 input
                got = compiled(m)(x).numpy()
                np.testing.assert_allclose(got, m(x.astype(np.float32)).numpy(), rtol=1e-5, atol=1e-6)
        print("ok")
        """,
        tmp_path,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert not _noise(r.stderr), r.stderr[-3000:]


def test_urllib3s_socks_warning_is_ignored_and_nothing_else(tmp_path):
    """TensorFlow's import reaches ``urllib3.contrib.socks`` (through ``requests``); without PySocks it warns.
    ``import pipeline`` ignores exactly that warning: other warnings still show."""
    r = _python(
        """
        import warnings
        import pipeline
        try:
            import urllib3.contrib.socks
        except ImportError:
            pass
        else:
            print("pysocks installed")
        warnings.warn("a warning of the user's own", UserWarning)
        """,
        tmp_path,
        PYTHONWARNINGS="default",
    )
    assert r.returncode == 0, r.stderr
    if "pysocks installed" not in r.stdout:
        assert "SOCKS" not in r.stderr and "DependencyWarning" not in r.stderr, r.stderr
    assert "a warning of the user's own" in r.stderr


def test_a_log_level_the_user_set_is_kept(tmp_path):
    r = _python(
        "import os, pipeline; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])", tmp_path, TF_CPP_MIN_LOG_LEVEL="0"
    )
    assert r.stdout.strip() == "0", r.stderr
    r = _python("import os, pipeline; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])", tmp_path)
    assert r.stdout.strip() == "2", r.stderr


def test_extract_summary_names_the_device_and_the_rows_of_each_split(tmp_path):
    from pipeline.cache.store import FeatureCache

    write_photo_folder(tmp_path / "photos", per_class=10)
    cfg = small_config(tmp_path / "cache", tmp_path / "photos")
    r = run_cli("extract", *[a for k, v in cfg.items() for a in ("--set", f"{k}={v}")])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    speed = next(line for line in lines if line.startswith("speed:"))
    assert "(CPU, " in speed, r.stdout  # no GPU on the test machines; a GPU run names it here
    path = next(line for line in lines if line.startswith("cache: ")).split(": ", 1)[1]
    with FeatureCache(path) as c:
        n = {name: int((c.split == code).sum()) for code, name in enumerate(("train", "val", "test"))}
        per_class = {name: np.bincount(c.labels[c.split == code], minlength=2) for code, name in enumerate(n)}
    assert f"splits: {n['train']} train · {n['val']} val · {n['test']} test" in lines, r.stdout
    small = [
        f"{cls} ({k[i]} in {name})"
        for name, k in per_class.items()
        if name != "train"
        for i, cls in enumerate(("china", "flower"))
        if k[i] < 5
    ]
    assert small, per_class  # 20 photos: val and test hold a few each
    warning = next(line for line in lines if line.startswith("warning: classes too small"))
    assert all(s in warning for s in small) and "--cv" in warning, (warning, small)

    again = run_cli("extract", *[a for k, v in cfg.items() for a in ("--set", f"{k}={v}")])
    assert "no backbone work" in again.stdout and "(CPU" not in again.stdout  # nothing ran: no device
    assert f"splits: {n['train']} train · {n['val']} val · {n['test']} test" in again.stdout.splitlines()


def test_small_split_note_counts_a_multilabel_class_by_its_positives():
    from pipeline.data.splits import SMALL_SPLIT_ROWS, class_counts, small_split_note

    labels = np.zeros((60, 2), np.uint8)
    labels[:, 0] = 1  # "shirt" in every image
    labels[::10, 1] = 1  # "hat" in one image in ten
    split = np.array([0] * 40 + [1] * 10 + [2] * 10)
    counts = class_counts(labels, split, ["shirt", "hat"])
    assert counts == {
        "train": {"shirt": 40, "hat": 4},
        "val": {"shirt": 10, "hat": 1},
        "test": {"shirt": 10, "hat": 1},
    }
    note = small_split_note(counts)
    assert note and "hat (1 in val)" in note and "hat (1 in test)" in note and "shirt" not in note
    labels[::2, 1] = 1  # hat in half the images: 5 positives in each of val and test
    assert small_split_note(class_counts(labels, split, ["shirt", "hat"])) is None
    assert SMALL_SPLIT_ROWS == 5
