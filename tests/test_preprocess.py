"""The one shared resize: antialiased when shrinking or enlarging, identity at the same size, dtype-blind."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.preprocess import resize_images


def _checkerboard(h: int, w: int) -> np.ndarray:
    """1-pixel black/white checks: the worst case for aliasing."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("shape", [(448, 448), (375, 500), (1000, 700)])
def test_shrinking_averages_instead_of_aliasing(shape):
    out = resize_images(_checkerboard(*shape), 224).numpy()
    # Every output pixel covers ≥ 1.5 input pixels of alternating 0/255: near mid-grey, never black or white.
    assert abs(out.mean() - 127.5) < 2
    assert out.min() > 60 and out.max() < 195
    if shape == (448, 448):  # exactly 2×: each output pixel is the mean of 2 black + 2 white
        assert np.allclose(out, 127.5)


def test_enlarging_is_smooth_bilinear():
    small = np.zeros((28, 28, 1), np.uint8)
    small[:, 14:] = 255
    out = resize_images(small, 224).numpy()[..., 0]
    row = out[100]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 4  # a ramp at the edge, not a jump


@pytest.mark.parametrize("policy", ["stretch", "crop", "pad"])
@pytest.mark.parametrize("shape", [(375, 500, 3), (28, 28, 1), (64, 64, 3), (100, 400, 3)])
def test_uint8_and_float_input_give_identical_pixels(policy, shape):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    a = resize_images(x, 64, policy).numpy()
    b = resize_images(x.astype(np.float32), 64, policy).numpy()
    assert a.dtype == np.float32 and a.shape == (64, 64, shape[-1]) and np.array_equal(a, b)


def test_batches_resize_like_single_images():
    x = np.random.default_rng(1).integers(0, 256, (3, 120, 90, 3), dtype=np.uint8)
    batch = resize_images(x, 48).numpy()
    for i in range(3):
        assert np.array_equal(batch[i], resize_images(x[i], 48).numpy())
