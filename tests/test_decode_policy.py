"""``data.decode``: JPEGs decoded at a DCT scale (1/2, 1/4, 1/8) in every stage alike, or exactly as 0.1 did.

Real JPEGs written with Pillow, sized so that a 32 px input (request 2 × 32 = 64 px) triggers each scale.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.decode import DCT_MARGIN, decode_image, decode_request
from pipeline.utils.config import load_config
from pipeline.utils.errors import FeatcacheError


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A real photo (scikit-learn's china.jpg) resampled to w×h: natural texture at every size."""
    from sklearn.datasets import load_sample_images

    img = Image.fromarray(load_sample_images().images[seed % 2])
    return img.resize((w, h), Image.Resampling.BICUBIC)


def _jpeg(path: Path, w: int, h: int, *, orientation: int = 1, seed: int = 0) -> Path:
    kw = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    _photo(w, h, seed).save(path, "JPEG", quality=92, **kw)
    return path


def _box_down(a: np.ndarray, s: int) -> np.ndarray:
    h, w = a.shape[0] // s * s, a.shape[1] // s * s
    return a[:h, :w].astype(np.float64).reshape(h // s, s, w // s, s, 3).mean((1, 3))


def test_decode_request_follows_the_policy():
    assert decode_request(32, "exact") is None
    assert decode_request(32, "dct") == (DCT_MARGIN * 32, DCT_MARGIN * 32)
    with pytest.raises(ValueError):
        decode_request(32, "fast")
    with pytest.raises(FeatcacheError, match="data.decode must be one of dct, exact"):
        load_config(None, {"data.decode": "fast"})


@pytest.mark.parametrize(("side", "scale"), [(100, 1), (130, 2), (260, 4), (520, 8), (1100, 8)])
def test_each_dct_scale_is_the_smallest_still_at_least_the_request(tmp_path, side, scale):
    """64 px requested: 130 px → 1/2, 260 → 1/4, 520 and more → 1/8; under 2× nothing changes."""
    w, h = side, side + 10
    f = _jpeg(tmp_path / "a.jpg", w, h)
    req = decode_request(32, "dct")
    got = decode_image(f, reduce_to=req)
    expect_scale = max(s for s in (1, 2, 4, 8) if w >= s * req[0] and h >= s * req[1])
    assert expect_scale == scale  # 1100 px stays at 1/8: libjpeg has no smaller scale
    assert got.shape == (math.ceil(h / expect_scale), math.ceil(w / expect_scale), 3)
    assert min(got.shape[:2]) >= 64
    full = decode_image(f)
    if expect_scale == 1:
        assert np.array_equal(got, full)  # nothing to gain: exactly the full decode
    else:  # the DCT scale is a box-like average of the full decode: close, not equal
        ref = _box_down(full, expect_scale)
        d = np.abs(got[: ref.shape[0], : ref.shape[1]].astype(np.float64) - ref)
        assert d.mean() < 3.0 and not np.array_equal(got[: ref.shape[0], : ref.shape[1]], ref)


def test_exact_policy_is_todays_full_decode(tmp_path):
    """``exact`` (and ``reduce_to=None``) is byte-for-byte the 0.1 decode, for JPEG and PNG alike; PNG ignores dct."""
    f = _jpeg(tmp_path / "a.jpg", 600, 400)
    full = decode_image(f)
    assert full.shape == (400, 600, 3)
    assert np.array_equal(decode_image(f, reduce_to=decode_request(32, "exact")), full)
    with Image.open(f) as im:  # the plain Pillow decode, no draft
        assert np.array_equal(np.asarray(im.convert("RGB")), full)
    png = tmp_path / "a.png"
    Image.fromarray(full).save(png)
    assert np.array_equal(decode_image(png, reduce_to=decode_request(32, "dct")), full)


def test_exif_rotated_jpeg_requests_in_displayed_orientation(tmp_path):
    """Stored 520×130 with orientation 6 (90° clockwise) shows 130 wide, 520 tall: the request is swapped."""
    f = _jpeg(tmp_path / "r.jpg", 520, 130, orientation=6)
    full = decode_image(f)
    assert full.shape == (520, 130, 3)  # displayed: portrait
    # 32 wide × 260 tall as displayed: only 1/2 fits (260 × 2 > 520 would need 1040 px of height)
    got = decode_image(f, reduce_to=(32, 260))
    assert got.shape == (260, 65, 3)
    # the same request read in stored orientation would not fit at all (130 < 2 × 260): no draft
    plain = _jpeg(tmp_path / "p.jpg", 520, 130)
    assert decode_image(plain, reduce_to=(32, 260)).shape == (130, 520, 3)
    # square requests: 64 px → 1/2 (130 // 64 = 2), and the content is the rotated image, not the stored one
    sq = decode_image(f, reduce_to=(64, 64))
    assert sq.shape == (260, 65, 3)
    d = np.abs(sq[:260, :65].astype(np.float64) - _box_down(full, 2)[:260, :65])
    assert d.mean() < 3.0


def test_the_decode_policy_is_in_the_fingerprint_and_exact_keeps_the_old_key():
    from pipeline.cache.fingerprint import decode_policy, feature_key, fingerprint
    from pipeline.features.backbones.registry import get_spec

    spec = get_spec("efficientnet_lite0")
    exact = feature_key(load_config(None, {"data.decode": "exact"}), spec, "sha256:x")
    dct = feature_key(load_config(None, {"data.decode": "dct"}), spec, "sha256:x")
    assert "decode" not in exact and dct["decode"] == {"policy": "dct", "margin": DCT_MARGIN}
    assert fingerprint(exact) != fingerprint(dct)
    assert (decode_policy(exact), decode_policy(dct)) == ("exact", "dct")


@pytest.fixture(scope="module")
def phone_run(tmp_path_factory) -> dict:
    """Two classes of small real-photo JPEGs plus one 12 MP photo; extracted at 32 px (dct), a logistic run."""
    from pipeline.stages.extract import extract
    from pipeline.stages.train import train

    root = tmp_path_factory.mktemp("phone")
    photos = root / "photos"
    for c, cls in enumerate(("china", "flower")):
        (photos / cls).mkdir(parents=True)
        for i in range(6):
            _jpeg(photos / cls / f"{cls}_{i}.jpg", 160 + 40 * i, 120 + 30 * i, seed=c)
    big = _jpeg(photos / "china" / "phone.jpg", 4032, 3024, seed=0)
    ov = {
        "data.source": str(photos),
        "extract.cache_dir": str(root / "cache"),
        "backbone.image_size": "32",
        "extract.batch_size": "8",
        "extract.progress": "false",
        "data.val_fraction": "0",
        "data.test_fraction": "0",
    }
    r = extract(load_config(None, ov))
    run = train(load_config(None, ov)).run_dir
    return {"root": root, "photos": photos, "big": big, "overrides": ov, "cache": r.path, "run": run}


def test_predict_on_a_12mp_photo_uses_the_pixels_extraction_used(phone_run, tmp_path):
    """A byte-different copy of the 12 MP photo (same pixels) is computed by predict, not read from the
    cache, and must give what its cached row gives; the exact decode would not."""
    from pipeline.cache.store import FeatureCache
    from pipeline.data.images import load_images, make_image_dataset
    from pipeline.data.sources import load_dataset
    from pipeline.stages.predict import predict
    from pipeline.utils.config import DataConfig

    with FeatureCache(phone_run["cache"]) as c:
        assert c.meta["feature_key"]["decode"]["policy"] == "dct" and c.meta["decode"] == "dct"
    copy = tmp_path / "phone-copy.jpg"
    copy.write_bytes(phone_run["big"].read_bytes() + b"\0trailing bytes after EOI")
    _, (cached, computed) = predict(phone_run["run"], [str(phone_run["big"]), str(copy)], top_k=2)
    assert (cached.source, computed.source) == ("cache", "computed")
    got, want = dict((i, p) for i, _, p in computed.top), dict((i, p) for i, _, p in cached.top)
    assert max(abs(got[i] - want[i]) for i in got) <= 1e-5

    # the pixels: the documented helper == the extraction pipeline's dct pixels != the exact decode's
    ds = load_dataset(DataConfig(source=str(phone_run["photos"])))
    (sample,) = [s for s in ds.samples if s.path.endswith("phone.jpg")]
    (_, batch, ok, _), *_ = list(make_image_dataset(ds, [sample], 32, "stretch", 1, decode="dct"))
    assert bool(ok.numpy()[0])
    dct = load_images([copy], 32, "stretch", "dct")
    assert np.array_equal(dct, batch.numpy())
    exact = load_images([copy], 32, "stretch", "exact")
    assert 0 < np.abs(dct - exact).mean() < 2.0


def test_feature_extractor_passes_the_policy(phone_run, tmp_path):
    """The transformer decodes like ``featcache extract``; ``decode="exact"`` is another cache, other pixels."""
    from pipeline.transformer import FeatureExtractor

    kw = {"image_size": 32, "cache_dir": str(tmp_path / "fx"), "engine": "tensorflow"}
    big = [str(phone_run["big"])]
    dct = FeatureExtractor(**kw).transform(big)
    exact = FeatureExtractor(decode="exact", **kw).transform(big)
    assert 0 < np.abs(dct - exact).max() / np.abs(exact).max() < 0.2  # close, not the same pixels
    caches = sorted(p.name for p in (tmp_path / "fx").glob("transform-*.h5"))
    assert len(caches) == 2  # one cache per policy, never mixed
    with pytest.raises(FeatcacheError, match="data.decode"):
        FeatureExtractor(decode="fast", **kw).transform(big)
    from pipeline.cache.store import FeatureCache

    with FeatureCache(phone_run["cache"]) as c:  # same pixels as ``featcache extract`` made
        row = c.keys.index("china/phone.jpg")
        np.testing.assert_allclose(dct[0], c.features(None, np.asarray([row]))[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_records_the_policy(phone_run, tmp_path):
    """export.json says which decode the model's pixels need; predict reads it back for the exported file."""
    from pipeline.stages.export import export
    from pipeline.stages.predict import predict

    report = export(phone_run["run"], "keras", tmp_path / "exp")
    assert report["ok"] and report["decode"] == "dct"
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["decode"] == "dct"
    predictor, (res,) = predict(tmp_path / "exp" / "model.keras", [str(phone_run["big"])], top_k=2)
    assert predictor.decode == "dct"
    (_, (cached,)) = predict(phone_run["run"], [str(phone_run["big"])], top_k=2)
    got, want = dict((i, p) for i, _, p in res.top), dict((i, p) for i, _, p in cached.top)
    assert max(abs(got[i] - want[i]) for i in got) <= 1e-4


def test_load_images_reads_bytes_and_paths_alike(tmp_path):
    f = _jpeg(tmp_path / "a.jpg", 300, 200)
    from pipeline.data.images import load_images

    a = load_images([f, f.read_bytes()], 32, "crop", "dct")
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.float32 and np.array_equal(a[0], a[1])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "PNG")
    assert load_images([buf.getvalue()], 32).shape == (1, 32, 32, 3)
