"""Invariants, property-tested.

* The cache fingerprint changes when, and only when, an input that changes a feature changes: backbone
  (under any spelling), the *content* of its weights, layers, pooling, effective input size, resize
  policy, stored dtype. Batch size, fractions, threads, progress bars, the cache folder, compression,
  engine, the head and search settings... never move it.
* A sample's row key is its content: any pixel or shape change gives a new digest, the same pixels
  anywhere give the same one.
* Splits are stable: removing samples, adding others, reordering or duplicating them never moves a
  sample to another split, and identical images always share a split (end to end through ``extract``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from faultkit import digits_npz, run, the_cache
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.cache.fingerprint import fingerprint
from pipeline.cache.locate import resolve_cache_path
from pipeline.cache.store import FeatureCache
from pipeline.data.sources import Dataset, Sample, content_digests
from pipeline.data.splits import assign_split
from pipeline.features.backbones.lite0_weights import weights_file
from pipeline.features.backbones.registry import get_spec
from pipeline.stages.extract import extract
from pipeline.utils.config import SPLITS, load_config

FIXTURE_OK = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

BACKBONE_SPELLINGS = {
    "efficientnet_lite0": ["efficientnet_lite0", "EfficientNet-Lite0"],
    "vgg16": ["vgg16", "VGG16"],
    "resnet50": ["resnet50", "ResNet50"],
    "efficientnet_b0": ["efficientnet_b0", "EfficientNetB0", "efficientnet-b0"],
}
LAYERS = [[], ["block_1"], ["block_1", "block_2"], ["block_2", "block_1"], ["top"]]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    (d / "a.h5").write_bytes(b"A" * 1000)
    (d / "a_copy.h5").write_bytes(b"A" * 1000)  # same content, other path: same features
    (d / "b.h5").write_bytes(b"A" * 999 + b"B")
    return {"a": d / "a.h5", "a_copy": d / "a_copy.h5", "b": d / "b.h5", "lite0": weights_file()}


@pytest.fixture(scope="module")
def cache_dirs(tmp_path_factory) -> list[Path]:
    """Two cache folders, each remembering a (stand-in) digest for every Keras ImageNet download."""
    dirs = [tmp_path_factory.mktemp("fp-cache-a"), tmp_path_factory.mktemp("fp-cache-b")]
    memo = {
        f"{name}:imagenet:{','.join(layers)}": f"sha256:keras-{name}-{'-'.join(layers)}"
        for name in BACKBONE_SPELLINGS
        for layers in LAYERS
    }
    for d in dirs:
        (d / ".weights-digests.json").write_text(json.dumps(memo))
    return dirs


TINY = Dataset(
    "tiny", "tiny", [Sample("0", "a"), Sample("1", "b")], ["a", "b"], arrays=np.zeros((2, 4, 4), np.uint8)
)


@st.composite
def config_values(draw, weights, cache_dirs) -> dict:
    name = draw(st.sampled_from(sorted(BACKBONE_SPELLINGS)))
    return {
        # feature-changing
        "backbone.name": draw(st.sampled_from(BACKBONE_SPELLINGS[name])),
        "backbone.weights": draw(st.sampled_from(["imagenet", "none", *map(str, weights.values())])),
        "backbone.layers": draw(st.sampled_from(LAYERS)),
        "backbone.pooling": draw(st.sampled_from(["avg", "max", "flatten", "none"])),
        "backbone.image_size": draw(st.sampled_from([0, 64, 96, 224])),
        "backbone.resize": draw(st.sampled_from(["stretch", "crop", "pad"])),
        "extract.dtype": draw(st.sampled_from(["float32", "float16"])),
        # not feature-changing
        "data.val_fraction": draw(st.sampled_from([0.1, 0.2, 0.0])),
        "data.test_fraction": draw(st.sampled_from([0.1, 0.3])),
        "data.limit": draw(st.sampled_from([0, 100])),
        "data.on_error": draw(st.sampled_from(["skip", "fail"])),
        "data.group_pattern": draw(st.sampled_from(["", r"^(\w+)_"])),
        "extract.batch_size": draw(st.sampled_from([1, 8, 32])),
        "extract.progress": draw(st.booleans()),
        "extract.cache_dir": str(draw(st.sampled_from(cache_dirs))),
        "extract.threads": draw(st.sampled_from([0, 1, 4])),
        "extract.compression": draw(st.sampled_from(["none", "gzip", "lzf"])),
        "extract.engine": draw(st.sampled_from(["tensorflow", "tflite", "auto"])),
        "extract.lock_timeout": draw(st.sampled_from([-1, 0, 5.5])),
        "train.head": draw(st.sampled_from(["logistic", "mlp"])),
        "train.seed": draw(st.sampled_from([0, 1])),
        "search.strategy": draw(st.sampled_from(["grid", "random"])),
        "search.n_trials": draw(st.sampled_from([4, 24])),
    }


FEATURE_KEYS = [
    "backbone.name",
    "backbone.weights",
    "backbone.layers",
    "backbone.pooling",
    "backbone.image_size",
    "backbone.resize",
    "extract.dtype",
]


def _effective(values: dict, weights: dict[str, Path]) -> tuple:
    """What a feature actually depends on, worked out independently of pipeline.cache.fingerprint."""
    spec = get_spec(values["backbone.name"])
    layers = tuple(values["backbone.layers"])
    w = values["backbone.weights"]
    if w == "none":
        identity = "random-init"
    elif w == "imagenet":
        identity = (
            hashlib.sha256(weights["lite0"].read_bytes()).hexdigest()
            if spec.name == "efficientnet_lite0"
            else f"keras:{spec.name}:{layers}"
        )
    else:
        identity = hashlib.sha256(Path(w).read_bytes()).hexdigest()
    size = values["backbone.image_size"] or spec.default_size
    return (
        spec.name,
        identity,
        layers,
        values["backbone.pooling"],
        size,
        values["backbone.resize"],
        values["extract.dtype"],
    )


def _fingerprint(values: dict) -> str:
    path, key, _ = resolve_cache_path(load_config(None, values), TINY)
    fp = fingerprint(key)
    assert fp[:12] in path.name
    return fp


@settings(FIXTURE_OK, max_examples=80)
@given(data=st.data())
def test_fingerprint_changes_iff_a_feature_changing_input_changes(weights, cache_dirs, data):
    first = data.draw(config_values(weights, cache_dirs))
    other = data.draw(config_values(weights, cache_dirs))
    changed = data.draw(st.sets(st.sampled_from(sorted(first))))
    second = {k: (other[k] if k in changed else v) for k, v in first.items()}
    if data.draw(st.booleans()):  # often exactly one feature input, so "only when" meets "when"
        k = data.draw(st.sampled_from(FEATURE_KEYS))
        second = {**first, k: other[k]}
    assume(second["data.val_fraction"] + second["data.test_fraction"] < 1)
    same_features = _effective(first, weights) == _effective(second, weights)
    assert (_fingerprint(first) == _fingerprint(second)) == same_features, (first, second)


def _array_dataset(images: np.ndarray) -> Dataset:
    samples = [Sample(str(i), "a", index=i) for i in range(len(images))]
    return Dataset("a", "a", samples, ["a"], arrays=images)


@settings(max_examples=60, deadline=None)
@given(
    img=arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3]))),
    where=st.integers(0, 1000),
    delta=st.integers(1, 255),
)
def test_a_row_key_is_its_content(img, where, delta):
    changed = img.copy()
    changed.flat[where % img.size] = (int(changed.flat[where % img.size]) + delta) % 256
    reshaped = img.reshape(img.shape[1], img.shape[0], img.shape[2])  # same bytes, other shape
    stack = [img, changed, img]
    digests, bad = content_digests(_array_dataset(np.stack(stack)), {})
    assert not bad
    d0, d1, d2 = (digests[str(i)][0] for i in range(3))
    assert d0 == d2 and d0 != d1  # same pixels anywhere: same key; one pixel changed: another
    if reshaped.shape != img.shape:
        (r,) = (v[0] for v in content_digests(_array_dataset(reshaped[None]), {})[0].values())
        assert r != d0


@settings(max_examples=300, deadline=None)
@given(
    digests=st.lists(st.text("0123456789abcdef", min_size=32, max_size=32), min_size=1, max_size=30),
    val=st.floats(0, 0.5),
    test=st.floats(0, 0.49),
    group=st.one_of(st.none(), st.text(max_size=5)),
)
def test_split_is_a_pure_function_of_content_or_group(digests, val, test, group):
    alone = [assign_split(d, fixed=None, group=None, val_fraction=val, test_fraction=test) for d in digests]
    shuffled = list(reversed(digests))
    again = [assign_split(d, fixed=None, group=None, val_fraction=val, test_fraction=test) for d in shuffled]
    assert alone == list(reversed(again))
    if group is not None:  # a group shares one split whatever its members
        assert (
            len(
                {
                    assign_split(d, fixed=None, group=group, val_fraction=val, test_fraction=test)
                    for d in digests
                }
            )
            == 1
        )
    for fixed in SPLITS:
        assert (
            assign_split(digests[0], fixed=fixed, group=group, val_fraction=val, test_fraction=test) == fixed
        )


# ------------------------------------------------------------------------------ splits, end to end

N_DIGITS = 600


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("splits")
    npz = digits_npz(root / "src" / "digits.npz", N_DIGITS)
    res = run("extract", "--data", npz, "--image-size", "32", "--quiet", "--cache-dir", root / "full")
    assert res.returncode == 0, res.stderr
    with FeatureCache(the_cache(root / "full")) as c:
        split_of = dict(zip(c.ids, map(int, c.split), strict=True))
    return root, npz, split_of


@settings(FIXTURE_OK, max_examples=12)
@given(
    keep=st.lists(st.integers(0, N_DIGITS - 1), min_size=1, max_size=N_DIGITS, unique=True),
    duplicates=st.lists(st.integers(0, N_DIGITS - 1), max_size=20),
)
def test_splits_survive_removal_reordering_and_duplication(digits_cache, tmp_path_factory, keep, duplicates):
    """A subset (so: the full set is this one plus additions), in any order, with duplicated images: every
    image keeps the split it has in the full set; all rows come from the cache (no backbone work)."""
    root, npz, split_of = digits_cache
    with np.load(npz) as z:
        images, labels, names = z["images"], z["labels"], z["class_names"]
    picked = keep + duplicates
    assume(len(set(labels[picked].tolist())) >= 2)  # a dataset needs two classes
    work = tmp_path_factory.mktemp("subset")
    np.savez(work / "digits.npz", images=images[picked], labels=labels[picked], class_names=names)
    shutil.copytree(root / "full", work / "cache")
    cfg = load_config(
        None,
        {
            "data.source": str(work / "digits.npz"),
            "backbone.image_size": 32,
            "extract.cache_dir": str(work / "cache"),
            "extract.progress": False,
        },
    )
    result = extract(cfg)
    assert result.extracted == 0 and result.rows == len(picked)
    with FeatureCache(result.path) as c:
        assert len(c.keys) == len(set(c.keys)) == len(picked)
        for digest, split in zip(c.ids, c.split, strict=True):
            assert split_of[digest] == int(split)
