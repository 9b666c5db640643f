"""Shared fixtures: real photos on disk, and the CLI as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(img) for img in load_sample_images().images]  # china.jpg, flower.jpg (427×640)


def write_photo_folder(root: Path, per_class: int = 10, seed: int = 0, start: int = 0) -> list[Path]:
    """A two-class folder dataset of real photo crops (JPEG and PNG, assorted sizes)."""
    rng = np.random.default_rng(seed)
    written = []
    for cls, photo in zip(("china", "flower"), _photos(), strict=True):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            h, w = int(rng.integers(120, 300)), int(rng.integers(120, 300))
            y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
            crop = photo[y : y + h, x : x + w]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            ext = ".jpg" if i % 3 else ".png"
            p = root / cls / f"{cls}_{i:03d}{ext}"
            Image.fromarray(np.ascontiguousarray(crop)).save(p, quality=92)
            written.append(p)
    return written


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    write_photo_folder(root)
    return root


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in a real subprocess."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_config(cache_dir: Path, source: str | Path, **extra) -> dict:
    """Overrides for a quick real extraction: the real Lite0 weights at a small input size."""
    return {
        "data.source": str(source),
        "extract.cache_dir": str(cache_dir),
        "backbone.image_size": 64,
        "extract.batch_size": 8,
        "extract.progress": False,
        **extra,
    }


def small_keywords(cache_dir: Path, source: str | Path, **extra) -> dict:
    """:func:`small_config` as the API's keywords (``section__key``), for ``extract(**...)``."""
    return {k.replace(".", "__"): v for k, v in small_config(cache_dir, source).items()} | extra


def make_digits_cache(base: Path) -> Path:
    """The shared real cache: ~1800 digits, 64 px, default backbone; idempotent (a rerun is a cache hit)."""
    from sklearn.datasets import load_digits

    from pipeline.stages.extract import extract

    root = base / "featcache-digits"
    root.mkdir(parents=True, exist_ok=True)
    npz = root / "digits.npz"
    if not npz.exists():
        d = load_digits()
        np.savez(npz, images=np.clip(d.images * 16, 0, 255).astype(np.uint8), labels=d.target)
    overrides = {
        "data.source": str(npz),
        "extract.cache_dir": str(root / "cache"),
        "backbone.image_size": "64",
        "extract.progress": "false",
    }
    return Path(extract(load_config(None, overrides)).path)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    return make_digits_cache(tmp_path_factory.getbasetemp())
