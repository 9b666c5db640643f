"""The README's main command, for real: ``make extract train`` on the built-in demo (a stable slice of it)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import REPO


@pytest.mark.slow
def test_make_extract_train_on_the_builtin_default(tmp_path):
    args = f"--set data.limit=600 --set backbone.image_size=64 --cache-dir {tmp_path / 'cache'} --quiet"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    res = subprocess.run(
        ["make", "-s", "extract", "train", f"ARGS={args}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "600 in cache" in res.stdout
    assert re.search(r"cache: \S*/fashion_mnist-[0-9a-f]{8}-efficientnet_lite0-[0-9a-f]{12}\.h5", res.stdout)
    acc = float(re.search(r"test accuracy: ([0-9.]+)", res.stdout).group(1))
    assert acc > 0.6  # 10 classes: chance is 0.1
