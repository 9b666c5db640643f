"""decode_image / read_bytes against the generated bad-input zoo (tests/zoo.py), no mocks."""

from __future__ import annotations

import os
import pickle
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402
from zoo import OK, ZOO_CASES, make_zoo  # noqa: E402

from pipeline.data.decode import IMAGE_EXTENSIONS, MAX_PIXELS, DecodeError, decode_image, read_bytes

JPEG_TOLERANCE = 8


def _case_id(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("zoo")
    return root, make_zoo(root)


def decoded(zoo_dir, name: str) -> np.ndarray:
    root, cases = zoo_dir
    if name not in cases:
        pytest.skip(f"{_case_id(name)} cannot be created on this system")
    return decode_image(root / name)


def assert_close(actual, expected, tol: int = JPEG_TOLERANCE) -> None:
    diff = np.abs(np.asarray(actual, np.int16) - np.asarray(expected, np.int16))
    assert diff.max() <= tol, f"{np.asarray(actual).tolist()} != {expected} (±{tol})"


# ----------------------------------------------------------------------------------------------- zoo


def test_make_zoo_writes_what_it_returns(tmp_path):
    cases = make_zoo(tmp_path)
    assert set(cases) <= set(ZOO_CASES)
    assert cases.keys() >= {
        "empty.jpg",
        "truncated.jpg",
        "bomb.png",
        "rgba.png",
        "gray16.png",
        "animated.gif",
    }
    for name in cases:
        assert os.path.lexists(tmp_path / name), _case_id(name)
    for name, expected in cases.items():
        if expected == OK:
            with Image.open(tmp_path / name) as im:
                assert max(im.size) <= 64, _case_id(name)
    assert (tmp_path / "bomb.png").stat().st_size < 1024


@pytest.mark.parametrize("name", sorted(ZOO_CASES), ids=[_case_id(n) for n in sorted(ZOO_CASES)])
def test_zoo_case(zoo_dir, name):
    root, cases = zoo_dir
    if name not in cases:
        pytest.skip(f"{_case_id(name)} cannot be created on this system")
    path, expected = root / name, cases[name]
    if expected == OK:
        arr = decode_image(path)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.size > 0
        assert arr.flags.c_contiguous
        # Same pixels whether a stage hands over the path or the bytes it read.
        np.testing.assert_array_equal(decode_image(read_bytes(path)), arr)
        np.testing.assert_array_equal(decode_image(str(path)), arr)
        return
    with pytest.raises(DecodeError, match=re.escape(expected)) as info:
        decode_image(path)
    assert info.value.path == os.fspath(path)
    # The bytes route (read_bytes, then decode_image) fails with the same reason at one of the two steps.
    try:
        data = read_bytes(path)
    except DecodeError as e:
        assert expected in str(e)
    else:
        with pytest.raises(DecodeError, match=re.escape(expected)):
            decode_image(data)


def test_zoo_files_are_what_they_claim(zoo_dir):
    """Guards the generator: the awkward encodings really are in the files."""
    root, cases = zoo_dir
    with Image.open(root / "cmyk.jpg") as im:
        assert im.mode == "CMYK" and im.info["adobe_transform"] == 0
    with Image.open(root / "cmyk_plain.jpg") as im:
        assert im.mode == "CMYK" and "adobe" not in im.info
    with Image.open(root / "ycck.jpg") as im:
        assert im.mode == "CMYK" and im.info["adobe_transform"] == 2
    with Image.open(root / "animated.gif") as im:
        assert im.n_frames == len(zoo.GIF_FRAMES)
    with Image.open(root / "gray16.png") as im:
        assert im.mode.startswith("I;16")
    assert (root / "rgb16.png").read_bytes()[24:26] == bytes([16, 2])  # IHDR bit depth, colour type
    with Image.open(root / "exif_rotated.jpg") as im:
        assert im.getexif()[0x0112] == zoo.EXIF_ORIENTATION
    for name, mode in [("float.tiff", "F"), ("int32.tiff", "I"), ("bilevel.png", "1"), ("la.png", "LA")]:
        with Image.open(root / name) as im:
            assert im.mode == mode, name


# ----------------------------------------------------------------------------------------------- pixels


def test_lossless_formats_are_exact(zoo_dir):
    expected = zoo.pattern_rgb(24, 16)
    for name in ["rgb.png", "image.bmp", "image.webp", "image.tiff", "name with spaces.png"]:
        np.testing.assert_array_equal(decoded(zoo_dir, name), expected, err_msg=name)


def test_non_utf8_file_name(zoo_dir):
    np.testing.assert_array_equal(decoded(zoo_dir, os.fsdecode(zoo.NON_UTF8_NAME)), zoo.pattern_rgb(24, 16))


def test_sixteen_bit_gray_scales_instead_of_clipping(zoo_dir):
    arr = decoded(zoo_dir, "gray16.png")
    gray = arr[0, :, 0].tolist()
    row = dict(zip(zoo.GRAY16_ROW, gray, strict=True))
    assert row[65535] == 255 and row[32896] == 128 and row[0] == 0 and row[255] == 0 and row[256] == 1
    assert gray == [v >> 8 for v in zoo.GRAY16_ROW]
    assert (arr == arr[..., :1]).all()


def test_sixteen_bit_rgb_scales_the_same_way(zoo_dir):
    arr = decoded(zoo_dir, "rgb16.png")
    assert arr.shape == (2, len(zoo.RGB16_ROW), 3)
    assert arr[0].tolist() == [[v >> 8 for v in px] for px in zoo.RGB16_ROW]
    assert arr[0, 0].tolist() == [255, 128, 0]
    assert arr[1].tolist() == arr[0, ::-1].tolist()


def test_rgba_composited_over_white(zoo_dir):
    px = decoded(zoo_dir, "rgba.png")[0].tolist()
    assert px[0] == [10, 20, 30]  # opaque: untouched
    assert px[1] == [255, 255, 255]  # transparent: white, whatever colour hid under alpha 0
    assert px[3] == [255, 255, 255]  # transparent black: white, not black
    r, g, b, a = zoo.RGBA_ROW[2]
    assert px[2] == [round((c * a + 255 * (255 - a)) / 255) for c in (r, g, b)]


def test_la_composited_over_white(zoo_dir):
    px = decoded(zoo_dir, "la.png")[0].tolist()
    assert px == [[50] * 3, [255] * 3, [127] * 3, [200] * 3]


def test_palette_colours_exact(zoo_dir):
    arr = decoded(zoo_dir, "palette.png")
    expected = np.array(zoo.PALETTE, np.uint8)[zoo.PALETTE_INDICES]
    np.testing.assert_array_equal(arr, expected)


def test_palette_transparency_becomes_white(zoo_dir):
    arr = decoded(zoo_dir, "palette_transparent.png")
    expected = np.array(zoo.PALETTE, np.uint8)[zoo.PALETTE_INDICES]
    expected[zoo.PALETTE_INDICES == zoo.PALETTE_TRANSPARENT_INDEX] = 255
    np.testing.assert_array_equal(arr, expected)


def test_gif_first_frame_only(zoo_dir):
    arr = decoded(zoo_dir, "animated.gif")
    assert arr.shape == (16, 16, 3)
    assert (arr == zoo.GIF_FRAMES[0]).all()


def test_gif_transparency_becomes_white(zoo_dir):
    arr = decoded(zoo_dir, "transparent.gif")
    transparent = zoo.PALETTE_INDICES == 0
    assert (arr[transparent] == 255).all()
    assert (arr[~transparent] == zoo.BLUE).all()


@pytest.mark.parametrize("name", ["cmyk.jpg", "cmyk_plain.jpg", "ycck.jpg"])
def test_cmyk_jpegs_give_the_right_rgb(zoo_dir, name):
    arr = decoded(zoo_dir, name)
    w, h = zoo.CMYK_SIZE
    assert arr.shape == (h, w, 3)
    assert_close(arr[h // 2, w // 4], zoo.CMYK_LEFT_RGB)
    assert_close(arr[h // 2, 3 * w // 4], zoo.CMYK_RIGHT_RGB)


def test_jpegs_rgb_and_gray(zoo_dir):
    rgb = decoded(zoo_dir, "rgb.jpg")
    assert rgb.shape == (24, 32, 3)
    assert_close(rgb[12, 4], zoo.RED)
    assert_close(rgb[12, 28], zoo.BLUE)
    gray = decoded(zoo_dir, "gray.jpg")
    assert (gray == gray[..., :1]).all()
    assert_close(gray[8, 2, 0], 100, tol=2)
    assert_close(gray[8, 21, 0], 200, tol=2)


def test_exif_orientation_applied(zoo_dir):
    arr = decoded(zoo_dir, "exif_rotated.jpg")
    w, h = zoo.EXIF_STORED_SIZE
    assert arr.shape == (w, h, 3)  # orientation 6: turned a quarter clockwise to display
    m = zoo.EXIF_MARKER
    assert_close(arr[m // 2, h - 1 - m // 2], zoo.RED)  # stored top-left → displayed top-right
    for corner in [arr[m // 2, m // 2], arr[w - 1 - m // 2, m // 2], arr[w - 1 - m // 2, h - 1 - m // 2]]:
        assert_close(corner, zoo.MID_GRAY)


def test_other_modes(zoo_dir):
    assert decoded(zoo_dir, "one_pixel.png").tolist() == [[list(zoo.INK)]]
    bilevel = decoded(zoo_dir, "bilevel.png")
    checker = (np.indices((4, 4)).sum(axis=0) % 2 == 0) * 255
    np.testing.assert_array_equal(bilevel, np.repeat(checker[..., None], 3, axis=2))
    # F: Pillow's 0..255 convention, clipped; I: 16-bit range like I;16, clipped.
    assert decoded(zoo_dir, "float.tiff")[0, :, 0].tolist() == [0, 0, 100, 255, 255]
    assert decoded(zoo_dir, "int32.tiff")[0, :, 0].tolist() == [0, 0, 128, 255, 255]


# ----------------------------------------------------------------------------------------------- limits


def test_bomb_refused_from_the_header_without_allocating(zoo_dir):
    root, _ = zoo_dir
    resource = pytest.importorskip("resource")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(DecodeError, match="image too large: 50000x50000 pixels exceeds the limit of") as info:
        decode_image(root / "bomb.png")
    with pytest.raises(DecodeError, match="50000x50000"):
        decode_image(read_bytes(root / "bomb.png"))
    assert time.perf_counter() - start < 0.5
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 64 * 1024  # 50000×50000 RGB would be 7.5 GB
    assert str(MAX_PIXELS) in str(info.value)


def test_max_pixels_argument(zoo_dir):
    root, _ = zoo_dir
    with pytest.raises(DecodeError, match="image too large: 32x24 pixels exceeds the limit of 100"):
        decode_image(root / "rgb.jpg", max_pixels=100)
    assert decode_image(root / "rgb.jpg", max_pixels=32 * 24).shape == (24, 32, 3)


def _between_pillow_warning_and_error(tmp_path: Path) -> tuple[Path, str]:
    if not Image.MAX_IMAGE_PIXELS:
        pytest.skip("Pillow's bomb guard is switched off in this process")
    w = 10_000
    h = Image.MAX_IMAGE_PIXELS // w + 10  # just past Pillow's warning threshold, far below its error
    path = tmp_path / "big.png"
    path.write_bytes(zoo.bomb_png(w, h))
    return path, f"{w}x{h}"


def test_pillow_bomb_warning_band_obeys_max_pixels(tmp_path):
    path, size = _between_pillow_warning_and_error(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DecodeError, match=f"image too large: {size} pixels exceeds the limit of 1000"):
            decode_image(path, max_pixels=1000)


def test_pillow_bomb_warning_as_error_becomes_decode_error(tmp_path):
    path, size = _between_pillow_warning_and_error(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DecodeError, match=f"image too large: {size} pixels exceeds Pillow's limit"):
            decode_image(path)


# ----------------------------------------------------------------------------------------------- misc


def test_empty_bytes_and_missing_file(tmp_path):
    with pytest.raises(DecodeError, match=re.escape("empty file (0 bytes)")):
        decode_image(b"")
    with pytest.raises(DecodeError, match="file not found"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(DecodeError, match="file not found"):
        read_bytes(tmp_path / "nope.png")


def test_decode_error_pickles_with_reason_and_path():
    err = pickle.loads(pickle.dumps(DecodeError("truncated image data", "/x/y.jpg")))
    assert str(err) == err.reason == "truncated image data" and err.path == "/x/y.jpg"


def test_image_extensions(zoo_dir):
    root, cases = zoo_dir
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
    for name, expected in cases.items():
        if expected == OK:
            assert Path(name).suffix.lower() in IMAGE_EXTENSIONS, _case_id(name)
    assert Path(".DS_Store").suffix.lower() not in IMAGE_EXTENSIONS


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_file_handles_leak(zoo_dir):
    root, cases = zoo_dir

    def decode_all():
        for name in cases:
            try:
                decode_image(root / name)
            except DecodeError:
                pass

    decode_all()  # first pass imports plugins lazily
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        decode_all()
    assert len(os.listdir("/proc/self/fd")) == before


def test_result_is_read_only(zoo_dir):
    for name in ["rgb.png", "gray16.png", "rgba.png"]:
        assert not decoded(zoo_dir, name).flags.writeable


# ----------------------------------------------------------------------------------------------- properties

_SIDES = st.tuples(st.integers(1, 16), st.integers(1, 16))
_FILE_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _png(im: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@_FILE_SETTINGS
@given(rgb=_SIDES.flatmap(lambda hw: arrays(np.uint8, (*hw, 3))))
def test_png_roundtrip_is_exact(tmp_path, rgb):
    data = _png(Image.fromarray(rgb))
    path = tmp_path / "roundtrip.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(decode_image(data), rgb)
    np.testing.assert_array_equal(decode_image(path), rgb)


@_FILE_SETTINGS
@given(rgba=_SIDES.flatmap(lambda hw: arrays(np.uint8, (*hw, 4))))
def test_alpha_over_white_formula(rgba):
    out = decode_image(_png(Image.fromarray(rgba)))
    c, a = rgba[..., :3].astype(np.int64), rgba[..., 3:].astype(np.int64)
    np.testing.assert_array_equal(out, (c * a + 255 * (255 - a) + 127) // 255)


@_FILE_SETTINGS
@given(gray=_SIDES.flatmap(lambda hw: arrays(np.uint16, hw)))
def test_sixteen_bit_gray_high_byte(gray):
    out = decode_image(_png(Image.fromarray(gray)))
    np.testing.assert_array_equal(out, np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2))


# ----------------------------------------------------------------------------------------------- libjpeg-turbo path


def _pillow_reference(data: bytes, reduce_to) -> np.ndarray:
    """What Pillow alone makes of a colour JPEG under the documented rules: draft, load, EXIF orientation."""
    import io

    from PIL import ImageOps

    im = Image.open(io.BytesIO(data))
    want = reduce_to
    if want is not None and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
        want = want[::-1]
    if want is not None and im.width >= 2 * want[0] and im.height >= 2 * want[1]:
        im.draft(None, want)
    im.load()
    return np.asarray(ImageOps.exif_transpose(im))


def _jpeg(pixels: np.ndarray, orientation: int = 1, **save) -> bytes:
    import io

    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, exif=exif.tobytes(), **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg")  # a real 427×640 photo


@pytest.mark.parametrize(
    "save",
    [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"progressive": True}],
    ids=["444", "422", "420", "progressive"],
)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_turbo_decode_is_pillows_pixels_bit_for_bit(photo, monkeypatch, save, orientation):
    """The libjpeg-turbo path must not change a single pixel: the cache fingerprint does not key it."""
    import pipeline.data.decode as decode

    calls = []
    real = decode.simplejpeg.decode_jpeg
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    big = np.asarray(Image.fromarray(photo).resize((1920, 1280), Image.Resampling.BICUBIC))
    for pixels, reduce_to in [(photo, None), (photo, (448, 448)), (big, (448, 448)), (big, (224, 224))]:
        data = _jpeg(pixels, orientation, **save)
        got = decode_image(data, reduce_to=reduce_to)
        want = _pillow_reference(data, reduce_to)
        assert got.shape == want.shape and np.array_equal(got, want), (pixels.shape, reduce_to)
        assert not got.flags.writeable
    assert len(calls) == 4  # every case took the fast path (scales 1, 1, 2 and 4)


def test_turbo_decode_leaves_damaged_jpegs_to_pillow(photo):
    """A JPEG with a corrupt scan decodes (libjpeg recovers, with a warning) exactly as Pillow decodes it."""
    data = bytearray(_jpeg(photo))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeroes in the middle of the entropy-coded data
    got = decode_image(bytes(data))
    assert np.array_equal(got, _pillow_reference(bytes(data), None))
