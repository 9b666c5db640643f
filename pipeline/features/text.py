"""The text tower of a KerasHub CLIP or SigLIP preset: prompts → embeddings in the joint image-text space.

A zero-shot head compares the cached ``pooled`` image embedding (``get_vision_embeddings``) with the
embeddings of class prompts (``get_text_embeddings``) of the same model. Prompts are tokenized by the
preset's own tokenizer through KerasHub's own preprocessor (CLIP: lower-cased; SigLIP: lower-cased,
punctuation stripped), packed to exactly the text encoder's sequence length (SigLIP reads the last
position; CLIP finds the end token as the largest id), and embedded on TensorFlow whatever engine extracted
the images. Each embedding is kept in ``<cache_dir>/text/<model>.npz``, keyed by the text model's
fingerprint (weights, configuration, tokenizer files, sequence length) and the exact prompt, so a prompt is
embedded once, ever.

KerasHub and TensorFlow are imported only inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features.backbones.hub_presets import HubPreset, is_hub_name, read_preset
from pipeline.utils.errors import FeatcacheError, first_line
from pipeline.utils.io import atomic_path, file_lock

#: the text-store format; a new one never reads another's embeddings
TEXT_FORMAT = "featcache-text/1"

#: KerasHub backbone class → (activation of its logits, preprocessor class)
TEXT_FAMILIES = {
    "CLIPBackbone": ("softmax", "CLIPPreprocessor"),
    "SigLIPBackbone": ("sigmoid", "SigLIPPreprocessor"),
}

#: how the tokenizer of a preset folder is stored (``tokenizer.save_to_preset``)
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TextTower:
    """A preset's text side: loaded on first use, with its logit scale (a log) and bias."""

    preset: HubPreset
    weights: str
    fingerprint: str
    sequence_length: int
    activation: str  # softmax (CLIP) | sigmoid (SigLIP)
    _model: Any = field(default=None, repr=False)
    _pre: Any = field(default=None, repr=False)

    def _load(self):
        if self._model is None:
            import keras_hub

            from pipeline.features.backbones.keras_hub import load_backbone

            root = load_backbone(self.preset, self.weights, self.preset.backbone_size)
            cls = getattr(keras_hub.models, TEXT_FAMILIES[self.preset.class_name][1])
            try:
                tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(self.preset.folder)
            except Exception as e:  # noqa: BLE001 - a missing or damaged asset: one line
                raise FeatcacheError(
                    f"--backbone {self.preset.ref}: cannot load the preset's tokenizer: {first_line(e, 200)}"
                ) from None
            self._pre = cls(tokenizer, sequence_length=self.sequence_length)
            self._model = root
        return self._model, self._pre

    def logits_params(self) -> tuple[float, float]:
        """(logit_scale, logit_bias) as stored: the scale is a log (the model multiplies by its exp)."""
        root, _ = self._load()
        head = getattr(root, "clip_head", None) or root.siglip_head
        scale = float(np.asarray(head.logit_scale))
        bias = float(np.asarray(head.logit_bias)) if hasattr(head, "logit_bias") else 0.0
        return scale, bias

    def token_ids(self, prompts: list[str]) -> np.ndarray:
        """The packed ids the model was trained on (KerasHub's own preprocessor, called eagerly)."""
        _, pre = self._load()
        out = pre({"prompts": list(prompts), "images": None})
        return np.asarray(out["token_ids"])

    def too_long(self, prompts: list[str]) -> list[str]:
        """Prompts whose tokens (with start/end) do not fit the sequence length: they are truncated."""
        _, pre = self._load()
        import tensorflow as tf

        text = tf.strings.lower(list(prompts))
        if self.activation == "sigmoid":
            text = pre.canonicalize_inputs(text)
        tokens = pre.tokenizer(text)
        rows = tokens.to_list() if hasattr(tokens, "to_list") else tokens
        n = np.asarray([len(r) for r in rows]) + int(pre.add_start_token) + int(pre.add_end_token)
        return [p for p, k in zip(prompts, n, strict=True) if k > self.sequence_length]

    def compute(self, prompts: list[str], batch: int = 256) -> np.ndarray:
        """Embeddings of ``prompts`` (N × D float32, as the model gives them: not normalised)."""
        root, _ = self._load()
        out = []
        for i in range(0, len(prompts), batch):
            ids = self.token_ids(prompts[i : i + batch])
            out.append(np.asarray(root.get_text_embeddings(ids), np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _tokenizer_digest(folder: Path) -> str:
    h = hashlib.sha256()
    files = [folder / TOKENIZER_FILE, *sorted((folder / "assets" / "tokenizer").glob("*"))]
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def text_tower(backbone: str, weights: str, weights_digest: str | None) -> TextTower:
    """The text tower of ``backbone`` (a KerasHub CLIP/SigLIP preset), or one line saying what would work.

    ``weights_digest`` is the cache's (it names the image weights; the text weights are in the same file)."""
    if not is_hub_name(backbone):
        raise FeatcacheError(
            f"--backbone {backbone}: has no text tower; zero-shot needs a KerasHub CLIP or SigLIP preset "
            "(hub:<preset>, a handle or a preset folder) extracted with --pooling pooled"
        )
    preset = read_preset(backbone)
    if preset.class_name not in TEXT_FAMILIES:
        raise FeatcacheError(
            f"--backbone {preset.ref}: {preset.family.name} has no text tower; zero-shot needs a CLIP or "
            "SigLIP preset extracted with --pooling pooled"
        )
    folder = Path(preset.folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise FeatcacheError(
            f"--backbone {preset.ref}: the preset has no tokenizer ({TOKENIZER_FILE} missing); zero-shot "
            "needs the folder save_to_preset wrote for the backbone and its tokenizer"
        )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text_cfg = config["config"]["text_encoder"]["config"]
    length = int(text_cfg["max_sequence_length"])
    key = {
        "format": TEXT_FORMAT,
        "preset": preset.config_digest,
        "weights": weights,
        "weights_digest": weights_digest,
        "tokenizer": _tokenizer_digest(folder),
        "sequence_length": length,
    }
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    activation = TEXT_FAMILIES[preset.class_name][0]
    return TextTower(preset, weights, fp, length, activation)


def store_path(store_dir: str | Path, tower: TextTower) -> Path:
    return Path(store_dir) / "text" / f"{tower.preset.label}-{tower.fingerprint[:16]}.npz"


def _read_store(path: Path, tower: TextTower) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != tower.fingerprint:
                return {}
            return dict(zip(z["prompts"].tolist(), z["embeddings"], strict=True))
    except (OSError, ValueError, KeyError):  # damaged: rebuilt from the model (it is only a cache)
        return {}


def embed_prompts(tower: TextTower, prompts: list[str], store_dir: str | Path | None) -> np.ndarray:
    """Embeddings of ``prompts`` (N × D), each computed once and kept in the text store of ``store_dir``."""
    for p in prompts:
        if not str(p).strip():
            raise FeatcacheError("zero-shot: an empty prompt; every prompt needs words")
    if store_dir is None:
        _note_truncated(tower, list(dict.fromkeys(prompts)))
        return tower.compute(list(prompts))
    path = store_path(store_dir, tower)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock"), f"{path}: in use", timeout=-1):
        known = _read_store(path, tower)
        new = [p for p in dict.fromkeys(prompts) if p not in known]
        if new:
            _note_truncated(tower, new)
            known.update(zip(new, tower.compute(new), strict=True))
            names = list(known)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(
                    f,
                    fingerprint=np.asarray(tower.fingerprint),
                    prompts=np.asarray(names, dtype=str),
                    embeddings=np.stack([known[n] for n in names]).astype(np.float32),
                )
    return np.stack([known[p] for p in prompts]).astype(np.float32)


def _note_truncated(tower: TextTower, prompts: list[str]) -> None:
    long = tower.too_long(prompts)
    if long:
        print(
            f"note: {len(long)} prompt(s) longer than {tower.preset.ref}'s {tower.sequence_length} tokens were "
            f"truncated, e.g. {long[0][:80]!r}",
            file=sys.stderr,
        )
