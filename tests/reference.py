"""Plain float64 NumPy ConvCRF inference (README, "The algorithm"): the oracle for every backend.

Written for clarity, not speed: explicit loops over window offsets and pooling cells.
"""

from __future__ import annotations

import math

import numpy as np


def pool_padding(n: int, b: int) -> int:
    return math.ceil(((b - n % b) % b) / 2)


def avg_pool(x: np.ndarray, b: int) -> np.ndarray:
    """[C,H,W] -> [C,ceil(H/b),ceil(W/b)]: mean over the valid pixels of each b×b cell."""
    if b == 1:
        return x.astype(np.float64)
    c, height, width = x.shape
    p0, p1 = pool_padding(height, b), pool_padding(width, b)
    h, w = -(-height // b), -(-width // b)
    out = np.zeros((c, h, w))
    for i in range(h):
        r0, r1 = max(i * b - p0, 0), min(i * b - p0 + b, height)
        for j in range(w):
            c0, c1 = max(j * b - p1, 0), min(j * b - p1 + b, width)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def _linear_weights(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D linear resampling, align_corners=False: output sample i sits
    at source coordinate (i + 0.5)·n_in/n_out − 0.5, clamped to the first and last sample."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C,h,w] -> [C,height,width] float64: bilinear resampling as torch's interpolate(
    mode="bilinear", align_corners=False), a matrix per axis."""
    rows = _linear_weights(height, x.shape[1])
    cols = _linear_weights(width, x.shape[2])
    return np.einsum("ij,cjk,lk->cil", rows, x.astype(np.float64), cols)


def upsample_crop(x: np.ndarray, b: int, height: int, width: int) -> np.ndarray:
    """Bilinear ×b upsampling of [C,h,w] then crop rows p0:p0+H, cols p1:p1+W."""
    if b == 1:
        return x
    _, h, w = x.shape
    up = resize_bilinear(x, h * b, w * b)
    p0, p1 = pool_padding(height, b), pool_padding(width, b)
    return up[:, p0 : p0 + height, p1 : p1 + width]


def gaussian(features: np.ndarray, k: int) -> np.ndarray:
    """[F,h,w] -> [k,k,h,w]: exp(-0.5·||f(x+a-s, y+c-s) - f(x,y)||²), 0 outside the grid."""
    _, h, w = features.shape
    s = k // 2
    g = np.zeros((k, k, h, w))
    for a in range(k):
        for c in range(k):
            for x in range(h):
                for y in range(w):
                    nx, ny = x + a - s, y + c - s
                    if 0 <= nx < h and 0 <= ny < w:
                        d = features[:, nx, ny] - features[:, x, y]
                        g[a, c, x, y] = math.exp(-0.5 * float(d @ d))
    return g


def kernel(image: np.ndarray, p) -> np.ndarray:
    """image [F,H,W] raw values -> combined kernel [k,k,h,w] on the coarse grid."""
    _, height, width = image.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pos = np.stack([rows, cols]).astype(np.float64) / p.pos_sdims
    col = image.astype(np.float64) / p.col_schan
    g_pos = gaussian(avg_pool(pos, p.blur), p.filter_size)
    g_col = gaussian(avg_pool(col, p.blur), p.filter_size)
    return p.pos_compat * g_pos + p.col_compat * g_col


def message(q: np.ndarray, kern: np.ndarray, b: int) -> np.ndarray:
    """q [C,H,W] -> message [C,H,W]."""
    _, height, width = q.shape
    pooled = avg_pool(q, b)
    _, h, w = pooled.shape
    k = kern.shape[0]
    s = k // 2
    padded = np.pad(pooled, ((0, 0), (s, s), (s, s)))
    out = np.zeros_like(pooled)
    for a in range(k):
        for c in range(k):
            out += kern[a, c][None] * padded[:, a : a + h, c : c + w]
    return upsample_crop(out, b, height, width)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=0, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=0, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def refine(image: np.ndarray, logits: np.ndarray, p) -> np.ndarray:
    """image [H,W,F] or [H,W]; logits [C,H,W] -> final Q [C,H,W] float64."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[:, :, None]
    image = image.transpose(2, 0, 1)
    lg = log_softmax(np.asarray(logits, dtype=np.float64))
    kern = kernel(image, p)
    q = lg if p.init == "log" else softmax(lg)
    for i in range(p.iterations):
        q = (p.unary_weight - p.weight) * lg + p.weight * message(q, kern, p.blur)
        if i < p.iterations - 1:
            q = softmax(q)
    return q
