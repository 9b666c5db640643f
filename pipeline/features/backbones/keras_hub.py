"""KerasHub vision transformers (DINOv2, DINOv3, SigLIP, CLIP, ViT) as frozen featcache backbones.

A preset (see :mod:`pipeline.features.backbones.hub_presets`) loads with KerasHub's own ``from_preset`` on its
folder, the code path of a downloaded preset. Its graph is then laid out again, block by block, from the
loaded layers (same weights, same ops: the features equal KerasHub's to float precision):

    pixels (already scaled by the preset's converter) → embedding → block1 … blockN → final norm [→ pooled head]

so every block's tokens can be cut (``--layer block11``), fine-tuning can unfreeze the top N blocks, and the
``.keras`` file holds plain KerasHub layers. Tokens are pooled by :class:`TokenPooling`; ``pooled`` takes the
model's own pooled output instead (SigLIP's attention-pooling head, CLIP's projected image embedding).

KerasHub itself is imported only here, inside the functions, and only when such a backbone is used.
"""

from __future__ import annotations

import keras

from pipeline.features.backbones.hub_presets import HubPreset, check_size
from pipeline.utils.errors import FeatcacheError, first_line

#: the families whose position embeddings adapt to another input size (interpolated, or rotary)
RESIZABLE = ("DINOV2Backbone", "DINOV3Backbone")


#: KerasHub's transformer block classes, the units ``--unfreeze top:N`` counts
BLOCK_CLASSES = ("DINOV2Layer", "DINOV3Layer", "SigLIPEncoderLayer", "CLIPEncoderLayer", "ViTEncoderBlock")


@keras.saving.register_keras_serializable(package="featcache")
class TokenPooling(keras.layers.Layer):
    """(N, T, D) tokens → (N, D') embedding. ``prefix_tokens`` (CLS and registers) come before the patches.

    ``cls``: the CLS token; ``mean``/``avg``: the mean of the patch tokens (registers excluded); ``max``:
    their maximum; ``cls+mean``: the CLS token and the patch mean, concatenated (DINOv2's linear probe).
    """

    MODES = ("cls", "mean", "cls+mean", "avg", "max")

    def __init__(self, mode: str, prefix_tokens: int, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown token pooling {mode!r}")
        self.mode, self.prefix_tokens = mode, int(prefix_tokens)

    def call(self, x):
        patches = x[:, self.prefix_tokens :]
        if self.mode == "max":
            return keras.ops.max(patches, axis=1)
        if self.mode in ("mean", "avg"):
            return keras.ops.mean(patches, axis=1)
        if self.mode == "cls":
            return x[:, 0]
        return keras.ops.concatenate([x[:, 0], keras.ops.mean(patches, axis=1)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1] * (2 if self.mode == "cls+mean" else 1))

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "prefix_tokens": self.prefix_tokens}


def load_backbone(preset: HubPreset, weights: str, size: int):
    """The KerasHub backbone of ``preset`` at ``size`` px: its weights (``imagenet``: the preset's own),
    ``none`` (random, seeded) or a ``.weights.h5`` file of the same architecture."""
    import keras_hub

    check_size(preset, size)
    kwargs = {}
    if size != preset.backbone_size:
        if preset.class_name not in RESIZABLE:
            raise FeatcacheError(
                f"--image-size {size}: {preset.family.name}'s position embeddings fix its input at "
                f"{preset.backbone_size} px (only DINOv2/DINOv3 take other sizes)"
            )
        kwargs["image_shape"] = (size, size, 3)
    keras.utils.set_random_seed(0)  # weights=none must mean the same random weights every run
    try:
        root = keras_hub.models.Backbone.from_preset(
            preset.folder, load_weights=weights == "imagenet", **kwargs
        )
    except Exception as e:  # noqa: BLE001 - a damaged or foreign folder: one line
        raise FeatcacheError(
            f"--backbone {preset.ref}: cannot load the preset: {first_line(e, 200)}"
        ) from None
    if weights not in ("imagenet", "none"):
        try:
            root.load_weights(weights)
        except Exception as e:  # noqa: BLE001
            raise FeatcacheError(
                f"--weights {weights}: cannot load into {preset.ref}: {first_line(e, 200)}"
            ) from None
    return root


def _dinov2(root, x):
    h = root.embeddings(x)
    blocks = []
    for block in root.encoder.layers:
        h = block(h)
        blocks.append(h)
    return blocks, root.layernorm(h), None


def _dinov3(root, x):
    h, rope = root.embeddings(x), root.rope_embedding(x)
    blocks = []
    for block in root.encoder.layers:
        h = block(h, position_embeddings=rope, num_prefix_tokens=1 + root.num_register_tokens)
        blocks.append(h)
    return blocks, root.layernorm(h), None


def _siglip(root, x):
    vision = root.vision_encoder
    h = vision.embedding(x)
    blocks = []
    for block in vision.encoder_layers:
        h = block(h)
        blocks.append(h)
    out = vision.post_layer_norm(h)
    return blocks, out, vision.head(out)


def _clip(root, x):
    vision = root.vision_encoder
    h = vision.pre_layer_norm(vision.embedding(x))
    blocks = []
    for block in vision.encoder_layers:
        h = block(h)
        blocks.append(h)
    out = vision.layer_norm(h)
    return blocks, out, root.vision_projection(root.vision_pooler(out))


def _vit(root, x):
    embedding, encoder = root.get_layer("vit_patching_and_embedding"), root.get_layer("vit_encoder")
    h = embedding(x)
    blocks = []
    for block in encoder.encoder_layers:  # the encoder's dropout is the identity at inference
        h = block(h)
        blocks.append(h)
    return blocks, encoder.layer_norm(h), None


_GRAPHS = {
    "DINOV2Backbone": _dinov2,
    "DINOV3Backbone": _dinov3,
    "SigLIPBackbone": _siglip,
    "CLIPBackbone": _clip,
    "ViTBackbone": _vit,
}


def check_pooling(preset: HubPreset, layers: list[str], pooling: str) -> None:
    """Refuse, in one line, what this family cannot pool."""
    fam = preset.family
    if pooling in ("cls", "cls+mean") and not preset.has_cls:
        raise FeatcacheError(f"--pooling {pooling}: {fam.name} has no CLS token (use mean or pooled)")
    if pooling == "pooled" and not fam.pooled:
        raise FeatcacheError(
            f"--pooling pooled: {fam.name} has no pooled output of its own (use cls, mean or cls+mean)"
        )
    if pooling == "pooled" and layers != ["output"]:
        raise FeatcacheError(
            "--pooling pooled: the model's pooled output follows its last block; drop --layer"
        )
    if pooling in ("flatten", "none"):
        raise FeatcacheError(
            f"--pooling {pooling}: use cls, mean, cls+mean, pooled, avg or max for {fam.name}"
        )


def token_cut(root, preset: HubPreset, layers: list[str], pooling: str, name: str):
    """Scaled pixels → one output per layer: its tokens (N, T, D), or the model's pooled output (N, D)."""
    check_pooling(preset, layers, pooling)
    vision = getattr(root, "vision_encoder", root)
    inp = keras.Input(tuple(vision.inputs[0].shape[1:]), dtype="float32", name="pixels")
    blocks, out, pooled = _GRAPHS[preset.class_name](root, inp)
    named = dict(zip(preset.layer_names, [*blocks, out], strict=True))
    outs = [pooled] if pooling == "pooled" else [named[layer] for layer in layers]
    return keras.Model(inp, outs if len(outs) > 1 else outs[0], name=name)


def is_block(layer) -> bool:
    return type(layer).__name__ in BLOCK_CLASSES


#: KerasHub layers whose ``get_config`` (keras-hub 0.32) writes derived keys their constructor refuses
DERIVED_KEYS = {"ViTPatchingAndEmbedding": ("num_patches", "num_positions"), "ViTEncoderBlock": ("key_dim",)}


def load_objects(config_text: str) -> dict:
    """Classes a ``.keras`` file of a KerasHub backbone needs beyond those Keras imports itself: ViT's layers
    with the derived keys of :data:`DERIVED_KEYS` left out when they are rebuilt."""
    if not any(name in config_text for name in DERIVED_KEYS):
        return {}
    from keras_hub.src.models.vit import vit_layers

    def lenient(name: str):
        base = getattr(vit_layers, name)

        def from_config(cls, config):
            return base.from_config({k: v for k, v in config.items() if k not in DERIVED_KEYS[name]})

        return type(name, (base,), {"from_config": classmethod(from_config)})

    return {name: lenient(name) for name in DERIVED_KEYS}
