"""Novelty at predict time: every prediction of a stage-2 run carries ``novelty`` (1 − cosine to the nearest
train row of the run's cache) and ``novel`` (above the threshold the run set on its val split). Real digits
cache, real run, real images of the same domain and of another (photo crops), as CLI subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import run_cli, write_photo_folder


def _digit_files(cache: Path, root: Path, n: int) -> list[Path]:
    """``n`` digits of the cache's test split written as PNG files (other bytes: features computed)."""
    from pipeline.cache.store import FeatureCache

    images = np.load(cache.parent.parent / "digits.npz")["images"]  # conftest.make_digits_cache's
    with FeatureCache(cache) as c:
        rows = c.rows("test")[:n]
        index = [int(c.keys[r]) for r in rows]  # an .npz cache's keys are the row numbers
    out = []
    for i in index:
        p = root / f"d{i:04d}.png"
        Image.fromarray(images[i]).save(p)
        out.append(p)
    return out


def test_predict_flags_another_domain_as_novel(digits_cache, tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(
        "train", "--cache", str(digits_cache), "--head", "logistic", "--set", f"train.runs_dir={runs}"
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = [p for p in runs.iterdir() if (p / "metrics.json").is_file()]
    novelty = json.loads((run / "metrics.json").read_text())["novelty"]
    assert novelty["percentile"] == 95 and novelty["threshold"] > 0
    assert abs(novelty["val_flagged"] - 0.05) < 0.02  # the percentile, by construction
    photos = write_photo_folder(tmp_path / "photos", per_class=10)
    (tmp_path / "digits").mkdir()
    digits = _digit_files(digits_cache, tmp_path / "digits", 30)
    proc = run_cli(
        "predict", "--model", str(run), str(tmp_path / "photos"), str(tmp_path / "digits"), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    out = {Path(r["image"]).name: r for r in json.loads(proc.stdout)}
    assert all(isinstance(r["novelty"], float) and isinstance(r["novel"], bool) for r in out.values())
    other = np.mean([out[p.name]["novel"] for p in photos])
    same = np.mean([out[p.name]["novel"] for p in digits])
    assert other >= 0.9 and same <= 0.3, (other, same)
    proc = run_cli("predict", "--model", str(run), str(photos[0]))  # the table shows it too
    assert proc.returncode == 0 and "novelty" in proc.stdout and "NOVEL" in proc.stdout


def test_a_large_cache_sets_its_threshold_without_building_an_index(digits_cache, tmp_path):
    """From ``index.exact_below`` rows on, train streams every train row against a sample of val rows
    (here every val row: fewer than the sample): the same threshold as the exact search, no index built."""
    found = {}
    for below in (10**9, 10):
        runs = tmp_path / f"runs-{below}"
        proc = run_cli(
            "train", "--cache", str(digits_cache), "--head", "ridge",
            "--set", f"train.runs_dir={runs}", "--set", f"index.exact_below={below}",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        (run,) = [p for p in runs.iterdir() if (p / "metrics.json").is_file()]
        found[below] = json.loads((run / "metrics.json").read_text())["novelty"]
    assert found[10]["index"].startswith("exact, on ") and "val_sample" in found[10]
    assert abs(found[10]["threshold"] - found[10**9]["threshold"]) < 1e-5
    assert found[10]["val_flagged"] == found[10**9]["val_flagged"]
    assert not list(digits_cache.parent.glob("*.index*")), "no index was built"
