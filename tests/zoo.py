"""The bad-input zoo: every awkward file a user's image folder can hold, generated at test time.

Nothing binary is committed: :func:`make_zoo` writes each case with Pillow/numpy (or by hand, where
Pillow cannot write the format) into a folder, in milliseconds. Every image is at most 64×64, except
the decompression bomb, whose header alone claims 50000×50000.

The module-level constants describe what was drawn so tests can check decoded pixels.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, features

OK = "ok"

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
INK = (12, 34, 56)
MID_GRAY = (127, 127, 127)  # CMYK (0, 0, 0, 128) in Pillow's naive CMYK → RGB

#: CMYK colours of the left and right halves of the CMYK/YCCK JPEGs, and the RGB they should become.
CMYK_LEFT, CMYK_RIGHT = (0, 255, 255, 0), (0, 0, 0, 128)
CMYK_LEFT_RGB, CMYK_RIGHT_RGB = RED, MID_GRAY
CMYK_SIZE = (32, 16)

#: RGBA pixels of rgba.png (one row): opaque, transparent, half-transparent, transparent black.
RGBA_ROW = [(10, 20, 30, 255), (10, 20, 30, 0), (200, 100, 50, 128), (0, 0, 0, 0)]
#: LA pixels of la.png (one row).
LA_ROW = [(50, 255), (50, 0), (0, 128), (200, 255)]
#: Palette of palette*.png / transparent.gif and the index grid drawn with it.
PALETTE = [RED, GREEN, BLUE, INK]
PALETTE_INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 1, 1]], np.uint8)
PALETTE_TRANSPARENT_INDEX = 1
#: 16-bit samples of gray16.png (one row).
GRAY16_ROW = [0, 255, 256, 4660, 32767, 32896, 65280, 65535]
#: 16-bit RGB pixels of rgb16.png (one row, written by hand: Pillow cannot write 16-bit RGB).
RGB16_ROW = [(65535, 32896, 0), (0, 65535, 257), (4660, 22136, 39612)]
#: Float samples of float.tiff and 32-bit integer samples of int32.tiff (one row each).
FLOAT_ROW = [-5.0, 0.0, 100.0, 255.0, 300.0]
INT32_ROW = [-5, 0, 32896, 65535, 70000]
#: Frames of animated.gif, in order.
GIF_FRAMES = [RED, GREEN, BLUE]
#: exif_rotated.jpg: stored W×H, a red square in the stored top-left corner, EXIF orientation 6.
EXIF_STORED_SIZE = (48, 32)
EXIF_MARKER = 12
EXIF_ORIENTATION = 6
BOMB_SIZE = (50_000, 50_000)
NON_UTF8_NAME = b"caf\xe9.png"


def pattern_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Deterministic colourful H×W×3 uint8 content for the lossless formats."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    im = Image.new(mode, size, left)
    im.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return im


# ----------------------------------------------------------------------------------------------- PNG


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, idat_raw: bytes) -> bytes:
    """A PNG built chunk by chunk; ``idat_raw`` is the filtered scanline data before zlib."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(idat_raw))
        + png_chunk(b"IEND", b"")
    )


def rgb16_png(rows: list[list[tuple[int, int, int]]]) -> bytes:
    """16-bit RGB PNG (colour type 2, big-endian samples, filter 0 on every row)."""
    raw = b"".join(b"\x00" + b"".join(struct.pack(">HHH", *px) for px in row) for row in rows)
    return png_bytes(len(rows[0]), len(rows), 16, 2, raw)


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose IHDR claims ``width``×``height`` RGB pixels."""
    return png_bytes(width, height, 8, 2, b"\x00" * 64)


# ----------------------------------------------------------------------------------------------- JPEG


def _save(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _jpeg(im: Image.Image, **params) -> bytes:
    return _save(im, "JPEG", quality=95, **params)


def _adobe_segment(data: bytes) -> int:
    """Offset of the APP14 "Adobe" marker segment (libjpeg writes one for every CMYK JPEG)."""
    i = data.find(b"\xff\xee")
    if i < 0 or data[i + 4 : i + 9] != b"Adobe":
        raise RuntimeError("Pillow wrote a CMYK JPEG without an Adobe APP14 marker")
    return i


def cmyk_jpeg(kind: str) -> bytes:
    """The same two CMYK colours as an Adobe (inverted) CMYK, plain CMYK or YCCK JPEG.

    Pillow always encodes CMYK with Adobe's inverted polarity (stored = 255 - value) and libjpeg adds
    an APP14 marker with transform 0. "plain": feed Pillow the inverted image (so stored = value) and
    cut the marker out. "ycck": store YCbCr of (C, M, Y) plus 255 - K and flip the marker's transform
    byte to 2, which is what libjpeg's YCCK → CMYK conversion (C = 255 - R, K kept) then undoes.
    """
    cmyk = np.asarray(halves(CMYK_SIZE, CMYK_LEFT, CMYK_RIGHT, "CMYK")).astype(np.float64)
    if kind == "adobe":
        stored = cmyk
    elif kind == "plain":
        stored = 255.0 - cmyk
    elif kind == "ycck":
        c, m, y, k = np.moveaxis(cmyk, -1, 0)
        luma = 0.299 * c + 0.587 * m + 0.114 * y
        cb = 128 - 0.168736 * c - 0.331264 * m + 0.5 * y
        cr = 128 + 0.5 * c - 0.418688 * m - 0.081312 * y
        stored = np.stack([255 - luma, 255 - cb, 255 - cr, k], axis=-1)
    else:
        raise ValueError(kind)
    data = _jpeg(Image.fromarray(np.clip(np.rint(stored), 0, 255).astype(np.uint8), "CMYK"))
    i = _adobe_segment(data)
    if kind == "plain":
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        return data[:i] + data[i + 2 + length :]
    if kind == "ycck":
        transform = i + 15  # FFEE, length(2), "Adobe", version(2), flags0(2), flags1(2), transform
        return data[:transform] + b"\x02" + data[transform + 1 :]
    return data


def exif_rotated_jpeg() -> bytes:
    im = Image.new("RGB", EXIF_STORED_SIZE, MID_GRAY)
    im.paste(Image.new("RGB", (EXIF_MARKER, EXIF_MARKER), RED), (0, 0))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = EXIF_ORIENTATION
    return _jpeg(im, exif=exif)


# ----------------------------------------------------------------------------------------------- zoo


def _palette_image(transparent: bool) -> Image.Image:
    im = Image.fromarray(PALETTE_INDICES, "P")
    im.putpalette([v for rgb in PALETTE for v in rgb])
    if transparent:
        im.info["transparency"] = PALETTE_TRANSPARENT_INDEX
    return im


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in GIF_FRAMES]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _noise_half(fmt: str, **params) -> bytes:
    data = _save(Image.fromarray(pattern_rgb(64, 64, seed=7)), fmt, **params)
    return data[: len(data) // 2]


#: What each case becomes: file name → "ok" or a substring of the DecodeError reason.
ZOO_CASES: dict[str, str] = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated image data",
    "truncated.png": "truncated image data",
    "truncated.webp": "truncated image data",
    "text.jpg": "not an image (cannot identify format)",
    ".DS_Store": "not an image (cannot identify format)",
    "._photo.jpg": "not an image (cannot identify format)",  # macOS AppleDouble sidecar
    "rgb.jpg": OK,
    "gray.jpg": OK,
    "cmyk.jpg": OK,
    "cmyk_plain.jpg": OK,
    "ycck.jpg": OK,
    "exif_rotated.jpg": OK,
    "rgb.png": OK,
    "rgba.png": OK,
    "la.png": OK,
    "palette.png": OK,
    "palette_transparent.png": OK,
    "gray16.png": OK,
    "rgb16.png": OK,
    "bilevel.png": OK,
    "one_pixel.png": OK,
    "animated.gif": OK,
    "transparent.gif": OK,
    "image.bmp": OK,
    "image.webp": OK,
    "image.tiff": OK,
    "float.tiff": OK,
    "int32.tiff": OK,
    "bomb.png": "image too large: 50000x50000",
    os.fsdecode(NON_UTF8_NAME): OK,
    "name with spaces.png": OK,
    "loop_a.jpg": "symlink loop",
    "loop_b.jpg": "symlink loop",
    "dangling.jpg": "file not found",
    "folder.jpg": "is a directory",
    "unreadable.jpg": "permission denied",
}


def _content_builders() -> dict[str, Callable[[], bytes]]:
    rgb = Image.fromarray(pattern_rgb(24, 16))
    la = Image.new("LA", (len(LA_ROW), 1))
    la.putdata(LA_ROW)
    rgba = Image.new("RGBA", (len(RGBA_ROW), 1))
    rgba.putdata(RGBA_ROW)
    gif = Image.fromarray((PALETTE_INDICES != 0).astype(np.uint8), "P")
    gif.putpalette([*RED, *BLUE])
    bilevel = Image.fromarray(np.indices((4, 4)).sum(axis=0) % 2 == 0)
    return {
        "empty.jpg": lambda: b"",
        "truncated.jpg": lambda: _noise_half("JPEG"),
        "truncated.png": lambda: _noise_half("PNG"),
        "truncated.webp": lambda: _noise_half("WEBP", lossless=True),
        "text.jpg": lambda: b"this is a text file that happens to be called .jpg\n",
        ".DS_Store": lambda: b"\x00\x00\x00\x01Bud1" + bytes(2040),
        "._photo.jpg": lambda: b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64),
        "rgb.jpg": lambda: _jpeg(halves((32, 24), RED, BLUE)),
        "gray.jpg": lambda: _jpeg(halves((24, 16), 100, 200, "L")),
        "cmyk.jpg": lambda: cmyk_jpeg("adobe"),
        "cmyk_plain.jpg": lambda: cmyk_jpeg("plain"),
        "ycck.jpg": lambda: cmyk_jpeg("ycck"),
        "exif_rotated.jpg": exif_rotated_jpeg,
        "rgb.png": lambda: _save(rgb, "PNG"),
        "rgba.png": lambda: _save(rgba, "PNG"),
        "la.png": lambda: _save(la, "PNG"),
        "palette.png": lambda: _save(_palette_image(False), "PNG"),
        "palette_transparent.png": lambda: _save(
            _palette_image(True), "PNG", transparency=PALETTE_TRANSPARENT_INDEX
        ),
        "gray16.png": lambda: _save(Image.fromarray(np.array([GRAY16_ROW], np.uint16)), "PNG"),
        "rgb16.png": lambda: rgb16_png([RGB16_ROW, RGB16_ROW[::-1]]),
        "bilevel.png": lambda: _save(bilevel, "PNG"),
        "one_pixel.png": lambda: _save(Image.new("RGB", (1, 1), INK), "PNG"),
        "animated.gif": _animated_gif,
        "transparent.gif": lambda: _save(gif, "GIF", transparency=0),
        "image.bmp": lambda: _save(rgb, "BMP"),
        "image.webp": lambda: _save(rgb, "WEBP", lossless=True),
        "image.tiff": lambda: _save(rgb, "TIFF"),
        "float.tiff": lambda: _save(Image.fromarray(np.array([FLOAT_ROW], np.float32)), "TIFF"),
        "int32.tiff": lambda: _save(Image.fromarray(np.array([INT32_ROW], np.int32)), "TIFF"),
        "bomb.png": lambda: bomb_png(*BOMB_SIZE),
        "name with spaces.png": lambda: _save(rgb, "PNG"),
    }


def _try_symlink(target: str, link: Path) -> bool:
    try:
        os.symlink(target, link)
        return True
    except (OSError, NotImplementedError):  # e.g. Windows without the privilege
        return False


def make_zoo(root: Path) -> dict[str, str]:
    """Write the zoo into ``root``; returns file name → expected outcome for every case created.

    Cases the platform cannot express (a non-UTF-8 name on a filesystem that refuses it, symlinks
    without the privilege, an unreadable file when running as root) are left out of the result.
    """
    root = Path(root)
    created: dict[str, str] = {}
    for name, build in _content_builders().items():
        if name.endswith(".webp") and not features.check("webp"):
            continue
        (root / name).write_bytes(build())
        created[name] = ZOO_CASES[name]

    non_utf8 = os.fsdecode(NON_UTF8_NAME)
    try:
        fd = os.open(os.path.join(os.fsencode(root), NON_UTF8_NAME), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except OSError:  # e.g. APFS/NTFS refuse invalid UTF-8
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(_save(Image.fromarray(pattern_rgb(24, 16)), "PNG"))
        if non_utf8 in os.listdir(root):
            created[non_utf8] = ZOO_CASES[non_utf8]

    if _try_symlink("loop_b.jpg", root / "loop_a.jpg") and _try_symlink("loop_a.jpg", root / "loop_b.jpg"):
        created["loop_a.jpg"] = created["loop_b.jpg"] = "symlink loop"
    if _try_symlink("missing.jpg", root / "dangling.jpg"):
        created["dangling.jpg"] = ZOO_CASES["dangling.jpg"]

    (root / "folder.jpg").mkdir()
    created["folder.jpg"] = ZOO_CASES["folder.jpg"]

    unreadable = root / "unreadable.jpg"
    unreadable.write_bytes(_jpeg(Image.new("RGB", (8, 8), RED)))
    unreadable.chmod(0)
    try:
        with open(unreadable, "rb"):
            pass  # root (or a permissive filesystem) can still read it: the case does not apply
    except PermissionError:
        created["unreadable.jpg"] = ZOO_CASES["unreadable.jpg"]
    else:
        unreadable.unlink()
    return created
