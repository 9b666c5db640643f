"""The shared resize's shrinking case compiled with numba: the same float32 pixels as TensorFlow, for less CPU.

:func:`pipeline.data.preprocess.resize_images` shrinks with ``tf.image.resize(method="area")``. Called per image
inside ``tf.data`` that is the largest CPU cost of extraction after the backbone and the JPEG decoder
(~1.2 ms of ~4 per 500×375 photo, 70 ms per 12 MP photo decoded in full). :func:`resize_array` computes the
same pixels, bit for bit, with a numba kernel that performs TensorFlow's float32 operations in TensorFlow's
order (``ResizeAreaOp``: each output pixel sums each covered row's span, edges weighted, then the rows,
edges weighted, then multiplies by ``1 / (height_scale × width_scale)``). It only reorganises the loops: a
row's span sums are computed once instead of once per output row that covers it. tests/test_area.py holds
it to TensorFlow on random sizes and every resize policy; whatever it does not cover (enlarging, numba
missing) returns None and goes through TensorFlow as before.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

#: Letterbox value of the ``pad`` policy, for both resizes: mid-gray maps to ~0 under every preprocessing
#: mode, unlike black.
PAD_VALUE = 127.0


@functools.cache
def _kernel():
    """The compiled resize, or None without numba. Compiled once per machine (numba's on-disk cache)."""
    try:
        from pipeline.data.area_kernel import area
    except ImportError:
        return None
    return area


def prepare() -> None:
    """Load the kernel on a background thread now, so the first batch does not wait for it.

    Loading costs ~1 s per process (numba's import and its on-disk cache, mostly outside the GIL): started
    before TensorFlow's import and the model build, it runs on the core those leave idle.
    """
    threading.Thread(target=_load, name="featcache-area-load", daemon=True).start()


def _load() -> None:
    try:
        kernel = _kernel()
        if kernel is not None:
            kernel(np.zeros((2, 2, 3), np.uint8), 1, 1)
    except Exception:  # noqa: BLE001 - only a head start: the first real call reports any problem
        pass


def available() -> bool:
    """Whether the compiled resize can run here (numba installed)."""
    return _kernel() is not None


def shrink(image: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """``tf.image.resize(image, (height, width), method="area")`` of an H×W×3 uint8 image no smaller than
    ``height``×``width``, as float32; None when numba is missing."""
    kernel = _kernel()
    if kernel is None:
        return None
    return kernel(np.ascontiguousarray(image, dtype=np.uint8), int(height), int(width))


def shrinks(shape: tuple[int, ...], size: int, policy: str = "stretch") -> bool:
    """Whether ``policy`` only shrinks an image of this (H, W, ...) shape: the case :func:`resize_array` covers."""
    h, w = shape[:2]
    if policy == "stretch":
        return h >= size and w >= size
    if policy == "crop":
        return min(h, w) >= size
    if policy == "pad":
        nh, nw = _letterbox_size(h, w, size)
        return h >= nh and w >= nw
    raise ValueError(f"unknown resize policy {policy!r}")


def resize_array(image: np.ndarray, size: int, policy: str = "stretch") -> np.ndarray | None:
    """:func:`pipeline.data.preprocess.resize_images` of one H×W×3 uint8 image when it only shrinks
    (the same float32 pixels), else None: enlarging, and any image without numba, stay with TensorFlow."""
    if not shrinks(image.shape, size, policy):
        return None
    h, w = image.shape[:2]
    if policy == "stretch":
        return shrink(image, size, size)
    if policy == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return shrink(image[top : top + side, left : left + side], size, size)
    return _letterbox(image, size)


def _letterbox_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The ``pad`` policy's inner size: long side to ``size``, in float32 arithmetic with half-to-even
    rounding, as TensorFlow computes it."""
    scale = np.float32(size) / np.float32(max(h, w))
    return max(1, int(np.round(np.float32(h) * scale))), max(1, int(np.round(np.float32(w) * scale)))


def _letterbox(image: np.ndarray, size: int) -> np.ndarray | None:
    """The ``pad`` policy of a shrinking image: centred on :data:`PAD_VALUE`."""
    nh, nw = _letterbox_size(*image.shape[:2], size)
    inner = shrink(image, nh, nw)
    if inner is None:
        return None
    out = np.full((size, size, 3), PAD_VALUE, np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = inner
    return out
