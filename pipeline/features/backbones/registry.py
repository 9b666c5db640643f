"""Which backbones exist, their preprocessing and default input size: a table, with no TensorFlow import.

Validating ``--backbone`` and computing a cache fingerprint must stay instant, so nothing here builds a
model; :mod:`pipeline.features.backbones.build` does that.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pipeline.features.backbones.hub_presets import HubPreset, is_hub_name, read_preset
from pipeline.utils.errors import FeatcacheError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    module: str  # where the constructor lives
    constructor: str
    preprocess: str  # a pipeline.data.preprocess.Preprocess mode (a KerasHub preset: its scale and offset)
    default_size: int
    preset: HubPreset | None = None  # a KerasHub backbone (pipeline.features.backbones.keras_hub)


def _k(name, module, ctor, pre, size):
    return BackboneSpec(name, f"keras.applications.{module}", ctor, pre, size)


_SPECS = [
    BackboneSpec(
        "efficientnet_lite0",
        "pipeline.features.backbones.efficientnet_lite",
        "build_efficientnet_lite0",
        "lite",
        224,
    ),
    _k("xception", "xception", "Xception", "tf", 299),
    _k("vgg16", "vgg16", "VGG16", "caffe", 224),
    _k("vgg19", "vgg19", "VGG19", "caffe", 224),
    _k("resnet50", "resnet", "ResNet50", "caffe", 224),
    _k("resnet101", "resnet", "ResNet101", "caffe", 224),
    _k("resnet152", "resnet", "ResNet152", "caffe", 224),
    _k("resnet50v2", "resnet_v2", "ResNet50V2", "tf", 224),
    _k("resnet101v2", "resnet_v2", "ResNet101V2", "tf", 224),
    _k("resnet152v2", "resnet_v2", "ResNet152V2", "tf", 224),
    _k("inception_v3", "inception_v3", "InceptionV3", "tf", 299),
    _k("inception_resnet_v2", "inception_resnet_v2", "InceptionResNetV2", "tf", 299),
    _k("mobilenet", "mobilenet", "MobileNet", "tf", 224),
    _k("mobilenet_v2", "mobilenet_v2", "MobileNetV2", "tf", 224),
    BackboneSpec("mobilenet_v3_small", "keras.applications", "MobileNetV3Small", "none", 224),
    BackboneSpec("mobilenet_v3_large", "keras.applications", "MobileNetV3Large", "none", 224),
    _k("densenet121", "densenet", "DenseNet121", "torch", 224),
    _k("densenet169", "densenet", "DenseNet169", "torch", 224),
    _k("densenet201", "densenet", "DenseNet201", "torch", 224),
    _k("nasnet_mobile", "nasnet", "NASNetMobile", "tf", 224),
    _k("nasnet_large", "nasnet", "NASNetLarge", "tf", 331),
    *[
        _k(f"efficientnet_b{i}", "efficientnet", f"EfficientNetB{i}", "none", s)
        for i, s in enumerate((224, 240, 260, 300, 380, 456, 528, 600))
    ],
    *[
        _k(f"efficientnet_v2_{v}", "efficientnet_v2", f"EfficientNetV2{v.upper()}", "none", s)
        for v, s in (("b0", 224), ("b1", 240), ("b2", 260), ("b3", 300), ("s", 384), ("m", 480), ("l", 480))
    ],
    *[
        _k(
            f"convnext_{v}",
            "convnext",
            "ConvNeXtXLarge" if v == "xlarge" else f"ConvNeXt{v.capitalize()}",
            "none",
            224,
        )
        for v in ("tiny", "small", "base", "large", "xlarge")
    ],
]


BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}


#: Families ``extract.engine=tflite-int8`` refuses, with what was measured (docs/engines.md, "Full-integer
#: int8"; random weights at 96 px, 13 real photos, int8 against float32 TFLite in the same run, 2 cores).
#: Every other family measured kept a mean feature cosine >= 0.99 and ran 1.5–11× faster.
INT8_REFUSED = {
    "mobilenet_v3": "its int8 model ran at 0.33× the speed of float32 TFLite",
    "convnext": "its int8 model ran at 0.37× the speed of float32 TFLite",
}

#: KerasHub transformers (ViT, DINOv2/v3, SigLIP, CLIP): a ViT-S/14-sized DINOv2 at 224 px, random weights, ran
#: int8 at 0.38× float32 TFLite's speed (4.3 against 11.3 images/s, 2 threads, interleaved), mean cosine 0.968
INT8_REFUSED_HUB = "a ViT-S/14-sized transformer ran int8 at 0.38× the speed of float32 TFLite"


def check_int8(spec: BackboneSpec) -> None:
    """Refuse ``extract.engine=tflite-int8`` for a family in :data:`INT8_REFUSED` or a KerasHub transformer,
    with what was measured."""
    families = (why for family, why in INT8_REFUSED.items() if spec.name.startswith(family))
    why = INT8_REFUSED_HUB if spec.preset is not None else next(families, "")
    if why:
        raise FeatcacheError(
            f"extract.engine=tflite-int8: {spec.name} does not quantize well to int8 ({why}); "
            "use extract.engine=auto or tflite"
        )


#: Families ``extract.engine=tflite-dynamic`` (dynamic-range int8: int8 weights, activations quantized per row
#: at run time, XNNPACK's ``qd8`` kernels) refuses: their dynamic-range model ran slower than float32 TFLite
#: (random weights at 160 px, 16 probe photos, best of 3 interleaved, 2 threads, AVX512-VNNI + AMX;
#: ``python -m benchmarks.bench_dynamic --cnn``, docs/engines.md, "Dynamic-range int8"). KerasHub
#: transformers, whose time is in matrix products, ran 3–5× faster; ResNet50 read faster (13.8×) only
#: because its random-weight float32 model ran abnormally slowly (6.9 images/s), so it is not refused.
DYNAMIC_REFUSED = {
    "efficientnet_lite0": "its dynamic-range model ran at 0.40× the speed of float32 TFLite",
    "mobilenet": "MobileNetV2's dynamic-range model ran at 0.37× the speed of float32 TFLite",
    "efficientnet": "EfficientNet-B0's dynamic-range model ran at 0.60× the speed of float32 TFLite",
    "convnext": "ConvNeXt-Tiny's dynamic-range model ran at 0.38× the speed of float32 TFLite",
}

#: What the one-line hint says a transformer gains (``python -m benchmarks --only dynamic``, docs/engines.md).
DYNAMIC_MEASURED = (
    "ViT-S/14 at 4.1× and ViT-B/16 at 5.3× float32 TFLite's speed (bare pass) on an AVX512-VNNI/AMX CPU"
)


def check_dynamic(spec: BackboneSpec) -> None:
    """Refuse ``extract.engine=tflite-dynamic`` for a family in :data:`DYNAMIC_REFUSED`, with what was measured."""
    why = next((why for family, why in DYNAMIC_REFUSED.items() if spec.name.startswith(family)), "")
    if why and spec.preset is None:
        raise FeatcacheError(
            f"extract.engine=tflite-dynamic: {spec.name} runs slower with dynamic-range int8 ({why}); "
            "it is meant for KerasHub transformers: use extract.engine=auto or tflite"
        )


def check_engine(spec: BackboneSpec, engine: str) -> None:
    """Refuse, before any work, a quantized engine the backbone's family measured badly with."""
    if engine == "tflite-int8":
        check_int8(spec)
    elif engine == "tflite-dynamic":
        check_dynamic(spec)


def dynamic_hint(spec: BackboneSpec, engine: str) -> str:
    """One line for a KerasHub transformer extracted on a float engine: the dynamic-range engine exists ("" else)."""
    if spec.preset is None or engine not in ("auto", "tensorflow", "tflite"):
        return ""
    return (
        f"hint: {spec.name} is a transformer: extract.engine=tflite-dynamic (dynamic-range int8) ran "
        f"{DYNAMIC_MEASURED}; its features differ slightly (its own cache, checked against float32)"
    )


def normalize_name(name: str) -> str:
    """``EfficientNetB0``, ``efficientnet-b0`` and ``efficientnet_b0`` all name the same backbone."""
    n = name.strip().lower().replace("-", "_")
    if n in BACKBONES:
        return n
    squashed = n.replace("_", "")
    for key, spec in BACKBONES.items():
        if squashed in (key.replace("_", ""), spec.constructor.lower()):
            return key
    return n


def hub_spec(name: str) -> BackboneSpec:
    """The spec of a KerasHub preset (``hub:<preset>``, a handle or a preset folder)."""
    p = read_preset(name)
    return BackboneSpec(
        p.label, "pipeline.features.backbones.keras_hub", p.class_name, p.preprocess, p.image_size, p
    )


def get_spec(name: str) -> BackboneSpec:
    key = normalize_name(name)
    if key not in BACKBONES and is_hub_name(name):
        return hub_spec(name)
    if key not in BACKBONES and ("/" in name or name.startswith(".")):
        raise FeatcacheError(f"unknown backbone {name!r}: no KerasHub preset folder there (no config.json)")
    if key not in BACKBONES:
        close = difflib.get_close_matches(key, BACKBONES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(BACKBONES)})"
        hint += "; KerasHub models: hub:<preset>, kaggle://…, hf://… or a preset folder"
        raise FeatcacheError(f"unknown backbone {name!r}{hint}")
    return BACKBONES[key]
