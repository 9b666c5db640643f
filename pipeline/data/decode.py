"""The one image decoder every stage uses: file or bytes → H×W×3 uint8 RGB, or a :class:`DecodeError`.

Cached features are only reusable if every run turns the same file into the same pixels, so this module
pins down every choice Pillow leaves open (alpha, 16-bit depth, CMYK polarity, EXIF orientation, bombs,
truncation) and never touches Pillow's global settings: it runs on tf.data worker threads next to other
code that may use Pillow differently.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo straight into numpy; without it every JPEG goes through Pillow (same pixels, slower)
    import simplejpeg
except ImportError:  # pragma: no cover - a declared dependency
    simplejpeg = None

from pipeline.utils.config import DECODE_POLICIES

#: Lower-case suffixes treated as images when scanning folders (anything else is ignored, not decoded).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)


#: Largest width×height decoded. Same as the point where Pillow itself refuses an image
#: (2 × its default ``PIL.Image.MAX_IMAGE_PIXELS``), but checked by us so the error can name the size.
MAX_PIXELS = 178_956_970


_WHITE = (255, 255, 255)


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


#: ``data.decode=dct`` decodes a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) whose image is still at least
#: this many times the backbone input on each side. Chosen by measurement (benchmarks/bench_decode.py).
DCT_MARGIN = 2


#: EXIF orientations that store the image transposed (rotated by 90° or 270°, possibly mirrored).
_TRANSPOSED = frozenset({5, 6, 7, 8})


#: What ``ImageOps.exif_transpose`` does for each EXIF orientation, as numpy index operations.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def decode_request(size: int, policy: str) -> tuple[int, int] | None:
    """The smallest displayed (width, height) ``policy`` needs for an ``size``×``size`` input; None: full size.

    ``dct`` asks for :data:`DCT_MARGIN` × ``size`` on both sides. One request serves every resize policy:
    ``stretch`` and ``crop`` need both sides that large, and ``pad`` (which needs only the long side) gets a
    request at least as strict, so no policy ever upsamples what a full decode would have shrunk.
    """
    if policy not in DECODE_POLICIES:
        raise ValueError(f"unknown decode policy {policy!r}")
    if policy == "exact":
        return None
    side = DCT_MARGIN * int(size)
    return side, side


class DecodeError(Exception):
    """A file that cannot become an image, with a short human reason (``str(err)`` is the reason).

    ``path`` is set when the input came from a file. It is kept out of the message on purpose: file names
    may be non-UTF-8 (surrogate-escaped) and would break printing the reason to a UTF-8 stream.
    """

    def __init__(self, reason: str, path: str | bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self):  # keep ``path`` across pickling (multiprocessing workers)
        return (type(self), (self.reason, self.path))


def os_error_reason(err: OSError) -> str:
    """Readable reason for an OSError from stat/open/read."""
    reasons = {
        errno.ENOENT: "file not found",
        errno.ENOTDIR: "file not found (a parent is not a directory)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "symlink loop",
        errno.EISDIR: "is a directory",
        errno.ENAMETOOLONG: "file name too long",
    }
    return reasons.get(err.errno, f"cannot read file ({err.strerror or err})")


def _open_file(path: str | bytes | os.PathLike) -> BinaryIO:
    """Open a regular, non-empty file for reading or raise DecodeError.

    ``stat`` comes first so a FIFO or device is refused instead of blocking ``open`` forever.
    """
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise DecodeError("is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError("not a regular file")
        if st.st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        return open(path, "rb")  # callers use it as a context manager
    except OSError as e:
        raise DecodeError(os_error_reason(e)) from e


def read_bytes(path: str | bytes | os.PathLike) -> bytes:
    """The whole file, or DecodeError for empty, missing, unreadable, looping or non-regular paths."""
    with _open_file(path) as f:
        try:
            data = f.read()
        except OSError as e:
            raise DecodeError(os_error_reason(e)) from e
    if not data:  # emptied between stat and read
        raise DecodeError("empty file (0 bytes)")
    return data


def decode_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = MAX_PIXELS,
    reduce_to: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode a path or the bytes of an image file into a read-only H×W×3 uint8 RGB array.

    ``bytes`` (or bytearray/memoryview) is file *content*; a path is anything else ``open`` accepts
    except bytes (pass ``os.fsdecode(p)`` for a bytes path). The array is a zero-copy view of the
    decoded pixels, hence read-only; ``.copy()`` it to modify in place.

    Choices that make the pixels deterministic:

    * only the first frame of animated GIF/WebP/multi-page TIFF;
    * EXIF orientation is applied (``ImageOps.exif_transpose``), so a rotated photo has the shape it shows;
    * transparency (RGBA, LA, palette/gray/RGB with tRNS) is composited over **white**: a transparent
      background then looks like paper, the way viewers show it, instead of whatever colour the encoder
      left in fully transparent pixels (often black, sometimes random), which would leak into features;
    * 16-bit samples keep the high byte (``v >> 8``; 65535 → 255, 32896 → 128) for gray as for RGB,
      which is what Pillow's own 16-bit RGB/RGBA PNG reader does; Pillow's ``convert`` would *clip*
      16-bit gray to 255 instead. Mode ``I`` is read as 16-bit too (Pillow's PPM/PNG readers use it
      so), clipped to 0..65535; float ``F`` images use Pillow's 0..255 convention (clipped);
    * CMYK JPEGs are inverted only when they carry an Adobe APP14 marker (the Adobe convention Pillow
      assumes for every CMYK JPEG); YCCK is converted by libjpeg. CMYK → RGB is Pillow's naive formula,
      ICC profiles are ignored;
    * ``reduce_to=None`` (the ``exact`` policy): no ``Image.draft``, every JPEG is decoded at full size;
    * ``reduce_to=(width, height)`` (see :func:`decode_request`): a JPEG is decoded by libjpeg straight at
      1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``), the smallest scale whose image is still at
      least ``width``×``height`` *as displayed*, i.e. after EXIF orientation (a photo stored sideways has
      the request swapped). The scale depends only on the file, so the pixels are as deterministic as a
      full decode; they differ slightly from it (that is why the policy is in the cache fingerprint).
      Other formats (PNG, WebP, TIFF, ...) have no DCT scaling and are always decoded at full size.

    Raises DecodeError for unreadable/empty files, non-images, truncated or corrupt data and images
    above ``max_pixels`` (checked from the header before any pixel memory is allocated). Pillow's own
    bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, a process-wide knob we leave alone) also applies:
    its DecompressionBombError, or its warning when a warnings filter turns it into an exception,
    becomes a DecodeError too. Truncated files fail unless the application itself set Pillow's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if memoryview(source).nbytes == 0:
            raise DecodeError("empty file (0 bytes)")
        with io.BytesIO(source) as fp:
            return _decode_stream(fp, max_pixels, reduce_to)
    try:
        with _open_file(source) as fp:
            return _decode_stream(fp, max_pixels, reduce_to)
    except DecodeError as e:
        if e.path is None:
            e.path = os.fspath(source)
        raise


def _decode_stream(fp: BinaryIO, max_pixels: int, reduce_to: tuple[int, int] | None) -> np.ndarray:
    try:
        im = Image.open(fp)
    except UnidentifiedImageError:
        raise DecodeError("not an image (cannot identify format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(_probe_size(fp), max_pixels, e) from e
    except Exception as e:  # plugins raise OSError, SyntaxError, ValueError, ... on bad headers
        raise _corrupt(fp, e, "cannot read image header") from e

    with im:  # never closes ``fp`` (we own it), but releases the plugin's state
        width, height = im.size
        if width <= 0 or height <= 0:
            raise DecodeError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise DecodeError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
        if reduce_to is not None and im.format in ("JPEG", "MPO"):
            _draft(im, reduce_to)
        fast = _turbo_decode(fp, im, (width, height))
        if fast is not None:
            return fast
        try:
            im.load()  # first frame only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _too_large(None, max_pixels, e) from e  # e.g. a GIF frame larger than its screen
        except MemoryError as e:
            raise DecodeError(f"out of memory decoding a {width}x{height} image") from e
        except Exception as e:
            raise _corrupt(fp, e, f"cannot decode {im.format or 'image'} data") from e
        _apply_exif_orientation(im)
        try:
            return _to_rgb_array(im)
        except MemoryError as e:
            raise DecodeError(f"out of memory decoding a {width}x{height} image") from e
        except Exception as e:  # e.g. LAB/HSV TIFFs Pillow cannot convert
            raise DecodeError(f"unsupported image mode {im.mode!r} ({e})") from e


def _draft(im: Image.Image, reduce_to: tuple[int, int]) -> None:
    """Ask libjpeg for the smallest DCT scale keeping the *displayed* image at least ``reduce_to``.

    Pillow's ``draft`` picks the largest of 1/8, 1/4, 1/2 with ``stored // scale >= request`` on both axes
    (and does nothing below 2×). The request is in displayed orientation, so for a file stored transposed
    (EXIF orientation 5–8) it is swapped first; unreadable EXIF means no rotation, as in
    :func:`_apply_exif_orientation`.
    """
    want_w, want_h = (max(1, int(v)) for v in reduce_to)
    if _orientation(im) in _TRANSPOSED:
        want_w, want_h = want_h, want_w
    if im.width >= 2 * want_w and im.height >= 2 * want_h:
        try:
            im.draft(None, (want_w, want_h))
        except MemoryError:
            raise
        except Exception:  # an odd file Pillow cannot scale (the same file every time): decode it in full
            pass


def _turbo_decode(fp: BinaryIO, im: Image.Image, stored: tuple[int, int]) -> np.ndarray | None:
    """A colour JPEG decoded by libjpeg-turbo straight into numpy, or None: let Pillow decode it.

    Pillow decodes with the same library and settings (ISLOW IDCT, fancy upsampling, the DCT scale its
    ``draft`` chose), so the pixels are bit-identical (tests/test_decode.py holds every subsampling,
    progressive files, DCT scales and EXIF orientations to it); what it saves is Pillow's copy out of its
    4-bytes-per-pixel storage, most of the decode cost of a ~500×375 photo. Anything unusual goes to Pillow:
    other colour modes, and any libjpeg warning (``strict``), so damaged files keep Pillow's verdict.
    """
    if simplejpeg is None or im.format not in ("JPEG", "MPO") or im.mode != "RGB":
        return None
    width, height = im.size  # after ``draft``
    scale = _dct_scale(stored, (width, height))
    try:
        fp.seek(0)
        pixels = simplejpeg.decode_jpeg(
            fp.read(), colorspace="RGB", min_width=width, min_height=height, min_factor=scale
        )
    except (ValueError, OSError):
        return None
    if pixels.shape != (height, width, 3):
        return None
    rotate = _ORIENT.get(_orientation(im))
    if rotate is not None:
        pixels = np.ascontiguousarray(rotate(pixels))
    pixels.flags.writeable = False  # the contract of the Pillow-backed path
    return pixels


def _dct_scale(stored: tuple[int, int], drafted: tuple[int, int]) -> int:
    """The 1/s scale Pillow's ``draft`` picked: the s whose rounded-up size it set."""
    for s in (8, 4, 2):
        if all((side + s - 1) // s == d for side, d in zip(stored, drafted, strict=True)):
            return s
    return 1


def _orientation(im: Image.Image):
    """The EXIF orientation value as ``ImageOps.exif_transpose`` looks it up (1 if unreadable or unhashable,
    where that lookup fails and nothing is rotated)."""
    try:
        value = im.getexif().get(0x0112, 1)
        hash(value)
        return value
    except MemoryError:
        raise
    except Exception:
        return 1


def _apply_exif_orientation(im: Image.Image) -> None:
    """Rotate/flip in place as the EXIF orientation says; a damaged EXIF block leaves pixels as stored.

    ``in_place=True`` avoids the copy ``exif_transpose`` otherwise makes when nothing needs rotating.
    Losing the orientation of a photo with broken metadata beats losing the photo.
    """
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except MemoryError:
        raise
    except Exception:
        pass


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """The loaded image as read-only H×W×3 uint8, following the rules in :func:`decode_image`."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_gray(im)
    if mode == "CMYK" and im.format in ("JPEG", "MPO") and "adobe" not in im.info:
        # Pillow reads every CMYK JPEG with Adobe's inverted polarity; without the Adobe marker the
        # samples were stored plainly, so undo that inversion (libvips and browsers do the same).
        im = ImageChops.invert(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        rgb = Image.new("RGB", im.size, _WHITE)
        rgb.paste(rgba, mask=rgba)  # round((c*a + 255*(255-a)) / 255) per channel, in C
        im = rgb
    elif mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)  # one copy out of Pillow; numpy marks it read-only


def _sixteen_bit_gray(im: Image.Image) -> np.ndarray:
    """16-bit (or 32-bit ``I``) gray → 8 bits by the high byte, tRNS gray value → white, 3 channels."""
    raw = np.asarray(im)  # uint16 of either byte order, or int32 for mode I
    if im.mode == "I":
        raw = np.clip(raw, 0, 65535)
    gray = (raw >> 8).astype(np.uint8)
    transparent = im.info.get("transparency")
    if isinstance(transparent, int):
        gray[raw == transparent] = 255
    out = np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    out.flags.writeable = False  # same contract as the Pillow-backed path
    return out


def _too_large(size: tuple[int, int] | None, max_pixels: int, err: Exception) -> DecodeError:
    """DecodeError for a bomb Pillow refused; names the size whenever the header could be read."""
    if size is None:
        return DecodeError(f"image too large: {err}")
    width, height = size
    if width * height > max_pixels:
        return DecodeError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
    limit = Image.MAX_IMAGE_PIXELS or 0
    if isinstance(err, Image.DecompressionBombError):
        limit *= 2
    return DecodeError(
        f"image too large: {width}x{height} pixels exceeds Pillow's limit of {limit} "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def _probe_size(fp: BinaryIO) -> tuple[int, int] | None:
    """Header width×height of an image ``Image.open`` refused as a decompression bomb.

    ``Image.open`` runs Pillow's bomb check before it returns the image, so when it raises, the only way
    to name the size is to run the format plugins' header parsers (the registry ``Image.open`` uses)
    ourselves. Reads headers only; any failure just means the message cannot name the size.
    """
    try:
        Image.init()
        fp.seek(0)
        prefix = fp.read(16)
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            try:
                if accept is not None:
                    verdict = accept(prefix)
                    if not verdict or isinstance(verdict, str):
                        continue
                fp.seek(0)
                return tuple(factory(fp, "").size)
            except Exception:
                continue
    except Exception:
        pass
    return None


def _corrupt(fp: BinaryIO, err: Exception, what: str) -> DecodeError:
    """Map a Pillow/OS failure to a reason; truncation gets one wording whatever the format."""
    text = str(err) or type(err).__name__
    if "truncated" in text.lower() or isinstance(err, EOFError) or _riff_truncated(fp):
        return DecodeError("truncated image data")
    return DecodeError(f"{what} ({text})")


def _riff_truncated(fp: BinaryIO) -> bool:
    """True for a RIFF (WebP) file shorter than its header says.

    libwebp reports a cut file only as "could not create decoder object"; the RIFF size field tells.
    """
    try:
        fp.seek(0)
        head = fp.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
            return False
        declared = int.from_bytes(head[4:8], "little") + 8
        return fp.seek(0, io.SEEK_END) < declared
    except (OSError, ValueError):
        return False
