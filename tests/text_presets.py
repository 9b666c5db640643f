"""Small random-weight CLIP and SigLIP presets *with their tokenizers*, saved by KerasHub's ``save_to_preset``.

The vocabularies are built here from the words the tests use (CLIP: byte-level BPE whose end token has the
largest id, as the text pooler's argmax needs; SigLIP: a word-level SentencePiece model whose ``</s>`` pads):
the code path of a downloaded preset, without a download.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

S = 32  # image size
TEXT_LENGTH = 16  # the text encoders' sequence length (SigLIP pads to exactly this)


def _bytes_to_unicode() -> list[str]:
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    _, chars = bytes_to_unicode()
    return [str(c) for c in chars]


def clip_tokenizer(words: list[str]):
    """A CLIP BPE tokenizer knowing ``words`` whole (any other text falls back to single bytes)."""
    import keras_hub

    base = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(base + [c + "</w>" for c in base])}
    merges: list[str] = []
    for w in sorted(set(words)):
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            rule = f"{pieces[0]} {pieces[1]}"
            merged = pieces[0] + pieces[1]
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id: CLIPTextPooler takes the argmax as the end
    return keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=merges)


def siglip_tokenizer(sentences: list[str]):
    """A word-level SentencePiece SigLIP tokenizer trained on ``sentences`` (lower case, no punctuation)."""
    import keras_hub
    import sentencepiece

    clean = [re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", s.lower())).strip() for s in sentences]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(clean),
        model_writer=buf,
        vocab_size=len({w for s in clean for w in s.split()}) + 3,
        model_type="WORD",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return keras_hub.models.SigLIPTokenizer(proto=buf.getvalue())


def save_text_preset(folder: Path, family: str, sentences: list[str], seed: int = 0, backbone=None) -> Path:
    """A ``family`` (clip | siglip) preset folder: backbone, tokenizer and image converter."""
    import keras
    import keras_hub

    words = [w for s in sentences for w in re.findall(r"[a-z]+|[^\sa-z]", s.lower())]
    tok = clip_tokenizer(words) if family == "clip" else siglip_tokenizer(sentences)
    if backbone is None:
        keras.utils.set_random_seed(seed)
        backbone = build_backbone(family, tok.vocabulary_size())
    backbone.save_to_preset(str(folder))
    tok.save_to_preset(str(folder))
    conv = keras_hub.layers.CLIPImageConverter if family == "clip" else keras_hub.layers.SigLIPImageConverter
    conv(image_size=(S, S), scale=1 / 127.5, offset=-1.0).save_to_preset(str(folder))
    return folder


def build_backbone(family: str, vocabulary_size: int, width: int = 32):
    m = __import__("keras_hub").models
    small = {"hidden_dim": width, "num_layers": 2, "num_heads": 2, "intermediate_dim": 2 * width}
    text = {"vocabulary_size": vocabulary_size, "embedding_dim": width, "max_sequence_length": TEXT_LENGTH}
    text.update(hidden_dim=width, num_layers=1, num_heads=2, intermediate_dim=2 * width)
    if family == "siglip":
        vision = m.SigLIPVisionEncoder(patch_size=8, image_shape=(S, S, 3), **small)
        siglip = m.SigLIPBackbone(vision, m.SigLIPTextEncoder(**text))
        siglip.siglip_head.logit_scale.assign(np.log(10.0))  # SigLIP's own initial values: exp → 10, bias -10
        siglip.siglip_head.logit_bias.assign(-1.0)  # -1 here, so random weights still give mid probabilities
        return siglip
    vision = m.CLIPVisionEncoder(patch_size=8, image_shape=(S, S, 3), **small)
    clip = m.CLIPBackbone(vision, m.CLIPTextEncoder(**text), projection_dim=16)
    emb = clip.vision_encoder.embedding  # a fresh CLIPVisionEncoder's position_ids are all zero
    emb.position_ids.assign(np.arange(emb.position_ids.shape[-1])[None].astype("int32"))
    return clip
