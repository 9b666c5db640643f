"""The numba kernel behind :mod:`pipeline.data.area` (imported only there, and only when it runs: numba
takes ~0.7 s to import). Every float32 operation is TensorFlow ``ResizeAreaOp``'s, in its order."""

from __future__ import annotations

import numba
import numpy as np

f32 = np.float32


@numba.njit(nogil=True, cache=True)
def weight(i, a, b, scale):
    """How much of input cell ``i`` lies in [a, b), as TensorFlow computes it."""
    lo, hi = f32(i), f32(i + 1)
    if lo < a:
        return scale if hi > b else hi - a
    return b - lo if hi > b else f32(1.0)


@numba.njit(nogil=True, cache=True)
def spans(in_size, out_size):
    """Per output index: first and end input index, and the weights of the first and last input."""
    scale = f32(in_size) / f32(out_size)
    start = np.empty(out_size, np.int64)
    end = np.empty(out_size, np.int64)
    first = np.empty(out_size, np.float32)
    last = np.empty(out_size, np.float32)
    for x in range(out_size):
        a, b = f32(x) * scale, f32(x + 1) * scale
        start[x], end[x] = np.int64(np.floor(a)), np.int64(np.ceil(b))
        first[x] = weight(start[x], a, b, scale)
        last[x] = weight(end[x] - 1, a, b, scale)
    return scale, start, end, first, last


@numba.njit(nogil=True, cache=True, boundscheck=False)
def row_sums(src, out_w, xs, xe, x0, x1):
    """Each input row's weighted span sums per output column (H_in × W_out·3), in TensorFlow's order."""
    in_h, in_w = src.shape[0], src.shape[1]
    flat = src.reshape(in_h, in_w * 3)
    rows = np.empty((in_h, out_w * 3), np.float32)
    a = np.empty(out_w, np.int64)
    b = np.empty(out_w, np.int64)
    for x in range(out_w):
        a[x] = min(in_w - 1, max(0, xs[x])) * 3
        b[x] = min(in_w - 1, max(0, xe[x] - 1)) * 3
    for r in range(in_h):
        p, o = flat[r], rows[r]
        for x in range(out_w):
            s0 = f32(p[a[x]]) * x0[x]
            s1 = f32(p[a[x] + 1]) * x0[x]
            s2 = f32(p[a[x] + 2]) * x0[x]
            if xs[x] + 1 != xe[x]:
                for k in range(xs[x] + 1, xe[x] - 1):
                    q = min(in_w - 1, max(0, k)) * 3
                    s0 += f32(p[q])
                    s1 += f32(p[q + 1])
                    s2 += f32(p[q + 2])
                s0 += f32(p[b[x]]) * x1[x]
                s1 += f32(p[b[x] + 1]) * x1[x]
                s2 += f32(p[b[x] + 2]) * x1[x]
            o[3 * x], o[3 * x + 1], o[3 * x + 2] = s0, s1, s2
    return rows


@numba.njit(nogil=True, cache=True, boundscheck=False)
def area(src, out_h, out_w):
    """H×W×3 uint8 (C order) → out_h×out_w×3 float32, ``tf.image.resize(method="area")`` bit for bit."""
    in_h = src.shape[0]
    hs, ys, ye, _, _ = spans(in_h, out_h)
    ws, xs, xe, x0, x1 = spans(src.shape[1], out_w)
    scale = f32(1.0 / np.float64(hs * ws))  # TensorFlow: float = 1.0 (double) / float product
    rows = row_sums(src, out_w, xs, xe, x0, x1)
    out = np.zeros((out_h, out_w * 3), np.float32)
    for y in range(out_h):
        a, b, o = f32(y) * hs, f32(y + 1) * hs, out[y]
        for i in range(ys[y], ye[y]):
            wy, row = weight(i, a, b, hs), rows[min(in_h - 1, max(0, i))]
            for j in range(out_w * 3):
                o[j] += row[j] * wy
        for j in range(out_w * 3):
            o[j] *= scale
    return out.reshape(out_h, out_w, 3)
