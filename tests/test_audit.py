"""``featcache audit``: planted label errors and planted near-duplicate copies in a real image folder.

The folder holds scikit-learn's handwritten digits as PNG files; some are put in the wrong class folder
and some get a second copy with other bytes (re-encoded as JPEG, or upscaled and saved as PNG). The real
backbone extracts them, ``featcache audit --json`` runs as a subprocess, and the planted items must be in
its answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

N_IMAGES, N_FLIPS, N_COPIES = 360, 8, 6
CLASSES = (0, 4, 5, 6, 7)  # digits a small linear head tells apart well: the planted flips stand out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(cache dir, image folder, flipped keys, planted pairs), extracted once for the module."""
    from sklearn.datasets import load_digits

    from pipeline.stages.extract import extract
    from pipeline.utils.config import load_config

    root = tmp_path_factory.mktemp("audit")
    images = root / "digits"
    d = load_digits()
    rng = np.random.default_rng(7)
    pick = rng.choice(np.flatnonzero(np.isin(d.target, CLASSES)), N_IMAGES, replace=False)
    order = rng.permutation(N_IMAGES)
    flips, sources = set(order[:N_FLIPS].tolist()), order[N_FLIPS : N_FLIPS + N_COPIES].tolist()
    keys, flipped = {}, []
    for i, idx in enumerate(pick):
        label = int(d.target[idx])
        if i in flips:
            label = int(rng.choice([c for c in CLASSES if c != label]))
        pixels = np.clip(d.images[idx] * 16, 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR)
        key = f"{label}/d{idx:04d}.png"
        (images / str(label)).mkdir(parents=True, exist_ok=True)
        img.save(images / key)
        keys[i] = key
        if i in flips:
            flipped.append(key)
    pairs = []
    for j, i in enumerate(sources):
        img, folder = Image.open(images / keys[i]), keys[i].split("/")[0]
        if j % 2:
            copy = f"{folder}/copy{j}.jpg"
            img.save(images / copy, quality=90)
        else:
            copy = f"{folder}/copy{j}.png"
            img.resize((64, 64), Image.Resampling.BICUBIC).save(images / copy)
        pairs.append(tuple(sorted((keys[i], copy))))
    cfg = {
        "data.source": str(images),
        "extract.cache_dir": str(root / "cache"),
        "backbone.image_size": "48",
        "extract.progress": "false",
    }
    extract(load_config(None, cfg))
    return root / "cache", images, flipped, pairs


@pytest.mark.slow
def test_audit_finds_planted_label_errors_and_copies(planted):
    cache_dir, images, flipped, pairs = planted
    common = ["--data", str(images), "--cache-dir", str(cache_dir), "--set", "backbone.image_size=48"]
    proc = run_cli("audit", *common, "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert set(report) == {"label_issues", "near_duplicates"}
    issues = report["label_issues"]
    assert all(set(it) == {"key", "given", "suggested", "score"} for it in issues)
    scores = [it["score"] for it in issues]
    assert scores == sorted(scores, reverse=True)  # most suspicious first
    top = {it["key"] for it in issues[: 2 * len(flipped)]}
    found = [k for k in flipped if k in top]
    assert len(found) >= 0.75 * len(flipped), (found, flipped, issues[:20])
    for it in issues:
        assert it["given"] == it["key"].split("/")[0] and it["suggested"] != it["given"]

    reported = {tuple(sorted((p["a"], p["b"]))): p for p in report["near_duplicates"]}
    assert set(pairs) <= set(reported), (pairs, list(reported)[:20])
    assert len(reported) <= 10 * len(pairs)
    for p in reported.values():
        assert set(p) == {"a", "b", "similarity", "splits"}
        assert len(p["splits"]) == 2 and set(p["splits"]) <= {"train", "val", "test"}
        assert 0.9 <= p["similarity"] <= 1.0 + 1e-5

    # the table and the CSV files beside the cache
    proc = run_cli("audit", *common, "--top", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "likely label errors" in proc.stdout and "near-duplicate pairs" in proc.stdout
    (label_csv,) = cache_dir.glob("*.label_issues.csv")
    (dup_csv,) = cache_dir.glob("*.near_duplicates.csv")
    assert len(label_csv.read_text().splitlines()) == len(issues) + 1
    assert len(dup_csv.read_text().splitlines()) == len(reported) + 1


def test_audit_api_on_the_shared_digits_cache(digits_cache):
    """The Python API on a clean real cache: few label issues, a consistent report, no files when asked."""
    import pipeline
    from pipeline.cache.store import FeatureCache

    cfg = pipeline.load_config(None, {"train.cache": str(digits_cache)})
    result = pipeline.audit(cfg, write_csv=False, threshold=0.9)
    with FeatureCache(digits_cache) as cache:
        keys, n = set(cache.keys), cache.n_rows
    assert result.rows == n and not result.files
    assert len(result.label_issues) < 0.2 * n  # sklearn's digits are labelled well
    for it in result.label_issues:
        assert it["key"] in keys and it["given"] != it["suggested"] and 0 < it["score"] <= 1
    for p in result.near_duplicates:
        assert p["a"] in keys and p["b"] in keys and p["similarity"] >= 0.9
        assert p["cross_split"] == (p["splits"][0] != p["splits"][1])
    report = result.to_json()
    assert [it["key"] for it in report["label_issues"]] == [it["key"] for it in result.label_issues]
    assert "likely label errors" in result.table(5)


def test_audit_near_duplicates_through_the_index_are_the_exact_ones(digits_cache, tmp_path):
    """Above ``index.exact_below`` rows the pairs come from the FAISS index: the same pairs on a real cache."""
    import shutil

    import pipeline

    cache = Path(shutil.copy(digits_cache, tmp_path / digits_cache.name))  # its index beside the copy
    cfg = pipeline.load_config(None, {"train.cache": str(cache), "extract.progress": "false"})
    exact = pipeline.audit(cfg, write_csv=False, folds=2, threshold=0.9)
    through = pipeline.audit(cfg, write_csv=False, folds=2, threshold=0.9, index__exact_below=10)
    pairs = {(p["a"], p["b"]): p["similarity"] for p in exact.near_duplicates}
    assert pairs and set(pairs) == {(p["a"], p["b"]) for p in through.near_duplicates}
    for p in through.near_duplicates:
        assert p["similarity"] == pytest.approx(pairs[(p["a"], p["b"])], abs=1e-4)
    assert list(tmp_path.glob("*.index"))  # built once, kept beside the cache


def test_audit_bad_input_is_one_line(tmp_path):
    proc = run_cli("audit", "--cache", str(tmp_path / "missing.h5"), "--json")
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "no cache at" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("audit", "--cache", str(tmp_path / "missing.h5"), "--threshold", "2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_cosine_scan_is_exact_with_small_blocks():
    from pipeline.index.neighbours import cosine_scan, l2_normalize

    rng = np.random.default_rng(0)
    X = rng.normal(size=(37, 5)).astype(np.float32)
    X[20] = X[3] * 2.5  # the same direction: cosine 1
    S = l2_normalize(X) @ l2_normalize(X).T
    np.fill_diagonal(S, -np.inf)
    for block in (4, 7, 64):
        scan = cosine_scan(X, floor=0.5, block=block)
        want = {(a, b) for a, b in zip(*np.nonzero(np.triu(S >= 0.5, 1)), strict=True)}
        assert set(zip(scan.a.tolist(), scan.b.tolist(), strict=True)) == want
        np.testing.assert_allclose(scan.top_sim[:, 0], S.max(axis=1), atol=1e-5)
        np.testing.assert_array_equal(scan.top_index[:, 0], S.argmax(axis=1))
        np.testing.assert_allclose(scan.top_sim[:, 1], np.sort(S, axis=1)[:, -2], atol=1e-5)
    assert scan.top_index[3, 0] == 20 and scan.top_index[20, 0] == 3


def test_confident_learning_flags_confident_disagreement_only():
    from pipeline.heads.label_noise import confident_joint, find_label_issues

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 40)
    proba = rng.dirichlet([1, 1, 1], size=len(labels)) * 0.2
    proba[np.arange(len(labels)), labels] += 0.8  # a confident model that agrees with the labels
    wrong = [5, 50, 90]
    for r, c in zip(wrong, [2, 0, 1], strict=True):  # ...except on three rows, where it is sure of another
        proba[r] = 0.02
        proba[r, c] = 0.96
    joint = confident_joint(labels, proba)
    assert joint.sum() == pytest.approx(len(labels))
    found = find_label_issues(labels, proba)
    assert sorted(found.rows.tolist()) == wrong
    assert found.suggested.tolist() == [proba[r].argmax() for r in found.rows]
    assert np.all(np.diff(found.score) <= 0)


def test_audit_help_stays_light():
    """Building the CLI (for ``featcache audit --help``) imports neither numpy nor the cache modules."""
    import subprocess
    import sys

    code = "import sys; from pipeline.cli import build_parser; build_parser(); print(sorted(m for m in ('numpy', 'h5py', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    proc = run_cli("audit", "--help")
    assert proc.returncode == 0 and "--threshold" in proc.stdout and "--json" in proc.stdout
