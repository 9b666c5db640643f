"""What a KerasHub backbone name means, read from its preset folder without importing TensorFlow.

``--backbone`` names a KerasHub model three ways: ``hub:<preset>`` (a KerasHub preset name, e.g.
``hub:dinov2_small``; the prefix keeps it apart from ``keras.applications`` names), a handle
(``kaggle://…``, ``hf://…``), or the path of a local preset folder (what ``save_to_preset`` writes:
``config.json``, ``model.weights.h5`` and, for image models, ``image_converter.json``). A folder is read here
directly; a preset name or handle is first brought into a local folder by KerasHub (a download, cached by
``kagglehub``/``huggingface_hub``), which is the only time this module imports KerasHub. Offline, that fails
in one line naming the preset, the handle tried and how to pass a folder instead.

Everything a feature depends on is read from the folder: the family (the backbone class), the input size
(the image converter's, else the backbone's), the patch size, the number of prefix tokens (CLS and
registers, which ``mean`` pooling leaves out), the converter's ``scale``/``offset`` and a digest of the
configuration files; the weights are hashed by :mod:`pipeline.cache.fingerprint`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.utils.errors import FeatcacheError

HUB_PREFIX = "hub:"


#: ``--pooling`` names for token sequences only (``avg``/``max`` pool the patch tokens, as they pool a CNN map)
TOKEN_POOLINGS = ("cls", "mean", "cls+mean", "pooled")


HANDLE_SCHEMES = ("kaggle://", "hf://")


@dataclass(frozen=True)
class Family:
    name: str  # the word the docs and errors use
    nested: str  # "" or the config key of the vision tower inside a vision-language backbone
    pooled: bool  # the model has a pooled output of its own (``--pooling pooled``)
    pooling: str  # the default ``--pooling`` (when none is given)


#: KerasHub backbone class → family. Token layout: [CLS?, registers…, patches…].
FAMILIES = {
    "DINOV2Backbone": Family("DINOv2", "", False, "cls+mean"),
    "DINOV3Backbone": Family("DINOv3", "", False, "cls+mean"),
    "SigLIPBackbone": Family("SigLIP", "vision_encoder", True, "pooled"),
    "CLIPBackbone": Family("CLIP", "vision_encoder", True, "pooled"),
    "ViTBackbone": Family("ViT", "", False, "cls"),
}


@dataclass(frozen=True)
class HubPreset:
    """A KerasHub preset as featcache uses it: where it is, what family, and its preprocessing."""

    ref: str  # the name as given: hub:<preset>, a handle, or a folder
    folder: str  # the local preset folder (absolute)
    label: str  # file-name-safe name for caches: hub_<preset or folder name>
    class_name: str  # the KerasHub backbone class
    image_size: int  # the converter's (what the preset expects)
    backbone_size: int  # the backbone's configured input size (position embeddings of ViT, SigLIP, CLIP)
    patch_size: int
    num_layers: int  # transformer blocks
    prefix_tokens: int  # CLS + register tokens before the patch tokens
    has_cls: bool
    scale: Any  # the image converter's scale (None, a number or one per channel)
    offset: Any
    config_digest: str  # sha256 of config.json and image_converter.json, canonical JSON

    @property
    def family(self) -> Family:
        return FAMILIES[self.class_name]

    @property
    def preprocess(self) -> str:
        """The in-graph preprocessing, as one string (it is part of the cache key)."""
        return "scale_offset " + json.dumps({"scale": self.scale, "offset": self.offset}, sort_keys=True)

    @property
    def layer_names(self) -> list[str]:
        """``--layer`` choices: each transformer block's output, then the backbone's final (normed) output."""
        return [f"block{i}" for i in range(1, self.num_layers + 1)] + ["output"]


def is_hub_name(name: str) -> bool:
    """A ``hub:`` name, a handle, or a folder holding a preset's ``config.json``."""
    n = str(name).strip()
    return (
        n.startswith(HUB_PREFIX)
        or n.startswith(HANDLE_SCHEMES)
        or (Path(n).expanduser() / "config.json").is_file()
    )


def _label(ref: str) -> str:
    parts = [p for p in re.split(r"[/:]+", ref.rstrip("/")) if p and not p.isdigit()]
    tail = parts[-1] if parts else "preset"
    return "hub_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._") or "preset")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FeatcacheError(f"{path}: not a readable KerasHub preset file ({e})") from None


def _numbers(value):
    """A converter's scale/offset, hashable: None, a number, or a tuple per channel."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value


def _size(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def read_folder(folder: Path, ref: str) -> HubPreset:
    """A local KerasHub preset folder → :class:`HubPreset` (no TensorFlow)."""
    config = _read_json(folder / "config.json")
    cls = config.get("class_name", "")
    if cls not in FAMILIES:
        known = ", ".join(f"{f.name} ({c})" for c, f in FAMILIES.items())
        raise FeatcacheError(
            f"--backbone {ref}: {cls or 'this preset'} is not a supported KerasHub image backbone (known: {known})"
        )
    family = FAMILIES[cls]
    inner = config["config"]
    vision = inner[family.nested]["config"] if family.nested else inner
    converter_path = folder / "image_converter.json"
    converter = _read_json(converter_path)["config"] if converter_path.is_file() else {}
    size = _size(converter.get("image_size") or vision["image_shape"])
    patch = _size(vision["patch_size"])
    registers = int(vision.get("num_register_tokens", 0))
    has_cls = cls != "SigLIPBackbone" and bool(vision.get("use_class_token", True))
    digest = hashlib.sha256()
    for part in (config, converter):
        digest.update(json.dumps(part, sort_keys=True).encode())
    return HubPreset(
        ref=ref,
        folder=str(folder.resolve()),
        label=_label(ref),
        class_name=cls,
        image_size=size,
        backbone_size=_size(vision["image_shape"]),
        patch_size=patch,
        num_layers=int(vision["num_layers"]),
        prefix_tokens=int(has_cls) + registers,
        has_cls=has_cls,
        scale=_numbers(converter.get("scale")),
        offset=_numbers(converter.get("offset")),
        config_digest="sha256:" + digest.hexdigest(),
    )


def settle(backbone, given: frozenset[str], preset: HubPreset) -> None:
    """Before extracting: a folder is named by its absolute path (workers and later stages find it from any
    directory), and ``--pooling`` not given means the family's default."""
    backbone.name = preset.ref
    if "backbone.pooling" not in given:
        backbone.pooling = preset.family.pooling


def check_size(preset: HubPreset, size: int) -> None:
    """The input size must be a whole number of patches."""
    if size % preset.patch_size:
        raise FeatcacheError(
            f"--image-size {size}: {preset.ref} cuts images into {preset.patch_size}-px patches; use a multiple"
            f" of {preset.patch_size} (its preset size is {preset.image_size})"
        )


def read_preset(name: str) -> HubPreset:
    """The preset ``name`` names; a preset name or handle is fetched (or found in the download cache)."""
    ref = str(name).strip()
    if not ref.startswith(HUB_PREFIX) and not ref.startswith(HANDLE_SCHEMES):
        folder = Path(ref).expanduser()
        if not (folder / "config.json").is_file():
            raise FeatcacheError(f"--backbone {ref}: no KerasHub preset folder there (no config.json)")
        return read_folder(folder, str(folder.resolve()))
    return read_folder(Path(fetch(ref)), ref)


def _handle(ref: str) -> str:
    """The handle KerasHub downloads for ``ref`` (a ``hub:`` name → its Kaggle handle)."""
    if not ref.startswith(HUB_PREFIX):
        return ref
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS

    preset = ref[len(HUB_PREFIX) :]
    if preset not in BUILTIN_PRESETS:
        import difflib

        close = difflib.get_close_matches(preset, list(BUILTIN_PRESETS), n=3)
        hint = f" (did you mean {', '.join('hub:' + c for c in close)}?)" if close else ""
        raise FeatcacheError(f"unknown backbone {ref!r}: KerasHub has no preset {preset!r}{hint}")
    return BUILTIN_PRESETS[preset]["kaggle_handle"]


def offline_error(ref: str, handle: str, why: str) -> FeatcacheError:
    return FeatcacheError(
        f"--backbone {ref}: cannot download KerasHub preset {handle} ({why}); offline, pass a local preset "
        "folder instead: --backbone PATH, a folder that keras_hub's save_to_preset wrote (config.json, "
        "model.weights.h5, image_converter.json)"
    )


def _why(e: BaseException) -> str:
    """A download failure in a few words: an unreachable host by name, anything else by its first line."""
    text = str(e)
    host = re.search(r"host='([^']+)'", text)
    if host and ("Resolution" in text or "resolve" in text or "Connection" in type(e).__name__):
        return f"no connection to {host.group(1)}"
    return (text.strip().splitlines() or [type(e).__name__])[0][:160]


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=16)
def fetch(ref: str) -> str:
    """The local folder of a preset name or handle: KerasHub's own download (cached), one line on failure.

    Hugging Face retries an unreachable host for ~25 s, so it is probed first (3 s) unless
    ``HF_HUB_OFFLINE`` asks for a copy downloaded before.
    """
    handle = _handle(ref)
    if (
        handle.startswith("hf://")
        and not os.environ.get("HF_HUB_OFFLINE")
        and not _reachable("huggingface.co")
    ):
        raise offline_error(
            ref, handle, "huggingface.co unreachable; HF_HUB_OFFLINE=1 uses a copy downloaded before"
        )
    try:
        from keras_hub.src.utils.preset_utils import get_file

        config = get_file(handle, "config.json")
    except FeatcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - requests/kagglehub/huggingface_hub errors: all mean "not here"
        raise offline_error(ref, handle, _why(e)) from None
    folder = Path(config).parent
    if "class_name" not in _read_json(folder / "config.json"):
        raise FeatcacheError(
            f"--backbone {ref}: {handle} is a Transformers checkpoint, not a KerasHub preset; convert it once "
            "(keras_hub.models.Backbone.from_preset(handle).save_to_preset(DIR), and its ImageConverter's) "
            "and pass --backbone DIR"
        )
    return str(folder)
