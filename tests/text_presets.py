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


#: the small trained CLIP's classes and the one caption template it learns from
COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210), "yellow": (220, 210, 40)}
CAPTION = "a photo of a {}."


def colour_images(
    n_per_class: int, seed: int, noise: float = 40.0, sides: tuple[int, int] = (10, 24)
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy grey 32-px images holding one coloured square each (random size and place): N×S×S×3 uint8, labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, rgb in enumerate(COLOURS.values()):
        for _ in range(n_per_class):
            img = rng.normal(128, noise, (S, S, 3))
            side = int(rng.integers(*sides))
            y, x = rng.integers(0, S - side, 2)
            img[y : y + side, x : x + side] = np.asarray(rgb) + rng.normal(0, noise / 2, (side, side, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.asarray(labels)


def write_colour_folder(root: Path, X: np.ndarray, y: np.ndarray) -> Path:
    """``colour_images``' output as a class-per-folder dataset of PNG files (``root/<colour>/<i>.png``)."""
    from PIL import Image

    names = list(COLOURS)
    for i, (img, c) in enumerate(zip(X, y, strict=True)):
        (root / names[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / names[c] / f"{i}.png")
    return root


def train_small_clip(folder: Path, steps: int = 150, seed: int = 0) -> Path:
    """A small CLIP trained here, contrastively, on captioned colour images ("a photo of a red."), saved
    as a preset folder with its tokenizer: a model whose zero-shot accuracy means something."""
    import keras
    import keras_hub
    import tensorflow as tf

    from pipeline.heads.zeroshot import IMAGENET_TEMPLATES

    keras.utils.set_random_seed(seed)
    names = list(COLOURS)
    sentences = [t.replace("{}", n) for t in (*IMAGENET_TEMPLATES, "{}") for n in names]
    words = [w for s in sentences for w in re.findall(r"[a-z]+|[^\sa-z]", s.lower())]
    tok = clip_tokenizer(words)
    model = build_backbone("clip", tok.vocabulary_size())
    pre = keras_hub.models.CLIPPreprocessor(tok, sequence_length=TEXT_LENGTH)
    ids = pre({"prompts": [CAPTION.format(n) for n in names], "images": None})["token_ids"]
    X, y = colour_images(64, seed + 1)
    X = X.astype(np.float32) / 127.5 - 1.0
    opt = keras.optimizers.Adam(3e-3)
    opt.build(model.trainable_variables)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            img = tf.math.l2_normalize(model.get_vision_embeddings(images), axis=-1)
            txt = tf.math.l2_normalize(model.get_text_embeddings(ids), axis=-1)
            logits = tf.exp(model.clip_head.logit_scale) * tf.matmul(img, txt, transpose_b=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(X), 32, replace=False)
        step(tf.constant(X[idx]), tf.constant(y[idx]))
    return save_text_preset(folder, "clip", sentences, backbone=model)
