"""The cache key: a digest of everything that changes a feature, computed without importing TensorFlow.

Sample content is keyed separately (one digest per row, see :mod:`pipeline.data.sources`); this module covers
the extractor side: backbone (a KerasHub preset: its configuration files too), the *content* of its weights,
layers, pooling, input size, resize policy, preprocessing, stored dtype, unless it is ``exact`` the decode
policy (``data.decode``), and the engine only where it changes features (:func:`engine_key`). Anything not
listed here cannot change a feature value.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.data.augment import VIEWS_RECIPE
from pipeline.data.decode import DCT_MARGIN
from pipeline.data.storage import is_url
from pipeline.features.backbones.registry import BackboneSpec
from pipeline.features.calibration import DYNAMIC_PART, Calibration, engine_part
from pipeline.utils.config import Config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.io import atomic_write, sha256_file

#: the names of the built-in demo source (one source, wherever its files are found)
BUILTIN_SOURCES = ("fashion_mnist", "fashion-mnist")
BUILTIN_IDENTITY = "fashion_mnist"  # their one source identity

FORMAT_VERSION = 2  # bump when the meaning of stored features changes (2: area resize for shrinking)


def _memo_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / ".weights-digests.json"


def _memo_key(spec: BackboneSpec, layers: list[str]) -> str:
    return f"{spec.name}:imagenet:{','.join(layers)}"


def weights_digest(spec: BackboneSpec, weights: str, layers: list[str], cache_dir: str | Path) -> str | None:
    """Content digest of the weights, or None when only building the model can tell (Keras downloads).

    Files are hashed directly; a Keras ImageNet download is hashed once after the model is built (see
    :func:`remember_weights_digest`) and remembered beside the caches.
    """
    if weights == "none":
        return "none:seed0"
    if weights == "imagenet" and spec.preset is not None:
        return preset_weights_digest(spec.preset.folder, cache_dir)
    if weights == "imagenet":
        if spec.name == "efficientnet_lite0":
            from pipeline.features.backbones.lite0_weights import weights_file

            return "sha256:" + sha256_file(weights_file())
        try:
            memo = json.loads(_memo_path(cache_dir).read_text())
        except (OSError, ValueError):
            return None
        return memo.get(_memo_key(spec, layers))
    p = Path(weights).expanduser()
    if not p.is_file():
        raise FeatcacheError(f"--weights: file not found: {weights} (use imagenet, none, or a weights file)")
    return "sha256:" + sha256_file(p)


def preset_weights_digest(folder: str | Path, cache_dir: str | Path) -> str:
    """sha256 of a KerasHub preset's weight files (``*.weights.h5``, and a sharded preset's ``*.weights.json``),
    remembered beside the caches by path, size and modification time: a ViT-L's 1.2 GB is hashed once."""
    files = sorted(Path(folder).glob("*.weights.h5")) + sorted(Path(folder).glob("*.weights.json"))
    if not files:
        raise FeatcacheError(f"--backbone {folder}: the preset folder has no model.weights.h5")
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo_key = "preset:" + json.dumps(stats)
    try:
        memo = json.loads(_memo_path(cache_dir).read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key not in memo:
        h = hashlib.sha256()
        for p in files:
            h.update(sha256_file(p).encode())
        memo[memo_key] = "sha256:" + h.hexdigest()
        _memo_path(cache_dir).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(_memo_path(cache_dir), json.dumps(memo, indent=1, sort_keys=True))
    return memo[memo_key]


def remember_weights_digest(
    spec: BackboneSpec, layers: list[str], cache_dir: str | Path, digest: str
) -> None:
    path = _memo_path(cache_dir)
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        memo = {}
    memo[_memo_key(spec, layers)] = digest
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(memo, indent=1, sort_keys=True))


def feature_key(cfg: Config, spec: BackboneSpec, digest: str, *, decodes: bool = True) -> dict[str, Any]:
    """The fields the fingerprint hashes, kept readable so ``cache info`` can show them.

    ``decodes`` is False for array datasets (``.npz``, the Fashion-MNIST demo): nothing is decoded, so the
    decode policy cannot change a feature and stays out of their key.
    """
    b = cfg.backbone
    key = {
        "format": FORMAT_VERSION,
        "backbone": spec.name,
        "weights_digest": digest,
        "layers": list(b.layers),
        "pooling": b.pooling,
        "image_size": b.image_size or spec.default_size,
        "resize": b.resize,
        "preprocess": spec.preprocess,
        "dtype": cfg.extract.dtype,
    }
    if spec.preset is not None:  # a KerasHub preset: its configuration (the weights are in the digest)
        key["preset"] = {"class": spec.preset.class_name, "config": spec.preset.config_digest}
    # ``exact`` is how 0.1 decoded, so its key stays the 0.1 key (old caches keep their file names); any
    # other policy changes pixels and gets its own caches, never mixing rows decoded two ways.
    if decodes and cfg.data.decode != "exact":
        key["decode"] = {"policy": cfg.data.decode, "margin": DCT_MARGIN}
    return key


def decode_policy(key: dict[str, Any]) -> str:
    """The ``data.decode`` a cache's feature key was extracted with (``exact`` when the key has none)."""
    spec = key.get("decode")
    return str(spec.get("policy", "exact")) if isinstance(spec, dict) else "exact"


def fingerprint(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


#: Engines whose features differ from float32's, so they are named in the feature key.
KEYED_ENGINES = ("tflite-int8", "tflite-dynamic")


def engine_key(cfg: Config, key: dict[str, Any], calibration: Calibration | None = None) -> dict[str, Any]:
    """``key`` plus the engine's share, only where the engine changes features: ``tflite-int8`` (with its
    calibration set), ``tflite-dynamic`` and a precision other than float32. The float engines agree within
    1e-4 and add nothing, so every float32 key is what it was."""
    x = cfg.extract
    if x.engine not in KEYED_ENGINES and x.precision == "float32":
        return key
    key = dict(key)
    if x.precision != "float32":
        key["precision"] = x.precision
    if x.engine == "tflite-int8":
        if calibration is None:
            raise ValueError("a tflite-int8 key needs its calibration set")
        key["engine"] = engine_part(calibration)
    if x.engine == "tflite-dynamic":
        key["engine"] = dict(DYNAMIC_PART)
    return key


def keyed_engine(key: dict[str, Any]) -> str:
    """The engine a cache's feature key names (``tflite-int8``, ``tflite-dynamic``), "" for float features."""
    part = key.get("engine")
    return str(part.get("name", "tflite-int8")) if isinstance(part, dict) else ""


def engine_selects(engine: str) -> str:
    """What :func:`keyed_engine` a cache must show for ``extract.engine=engine``: "" (the float caches) for
    every engine that does not change features."""
    return engine if engine in KEYED_ENGINES else ""


def views_key(cfg: Config, key: dict[str, Any]) -> dict[str, Any]:
    k = int(cfg.extract.augment_views)
    if k < 0:
        raise FeatcacheError(f"config: extract.augment_views must be >= 0, got {k}")
    if k == 0:
        return key  # caches without views keep their fingerprint
    augment = [a.strip().lower() for a in cfg.finetune.augment if a.strip().lower() not in ("", "none")]
    if not augment:
        raise FeatcacheError("extract.augment_views needs at least one augmentation in finetune.augment")
    return {**key, "augment_views": {"k": k, "augment": augment, "recipe": VIEWS_RECIPE}}


def source_identity(source: str) -> str:
    """Which source a cache belongs to: the resolved path (symlinks followed) of a folder, CSV, ``.npz``,
    Parquet folder or local shard pattern, the URL of a remote one, ``fashion_mnist`` for the demo. Two
    sources named alike (``a/imgs``, ``b/imgs``) differ here, so they never share a cache."""
    src = source.strip()
    if src in BUILTIN_SOURCES:
        return BUILTIN_IDENTITY
    if src.startswith("file://"):
        src = src[len("file://") :]
    if is_url(src):
        return src.rstrip("/")
    return os.path.realpath(os.path.expanduser(src)).rstrip("/") or "/"


def source_tag(identity: str) -> str:
    """The short digest of a source identity that a cache's file name carries."""
    return hashlib.sha256(identity.encode()).hexdigest()[:8]
