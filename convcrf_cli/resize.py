"""Bringing a unary of another size to the image's size (``--resize-unary``).

- Logits ``[C,h,w]`` are resized bilinearly as segmentation networks upsample theirs: PyTorch's
  ``interpolate(mode="bilinear", align_corners=False)`` (pixel centres aligned, source
  coordinates clamped at the edges, no antialiasing when shrinking), computed in float32.
- Label maps ``[h,w]`` are resized by nearest neighbour with the same pixel-centre alignment:
  output row ``i`` takes source row ``floor((i + 0.5)·h/H)`` (PyTorch's ``nearest-exact``,
  Pillow's ``NEAREST``), in exact integer arithmetic.
- :func:`aspect_matches` is the rule that tells a downscaled unary's layout: ``h×w`` has the
  aspect ratio of ``H×W`` when ``|h·W − w·H| ≤ H + W``, that is when ``h×w`` is ``H×W`` scaled
  by one factor with each side rounded by up to one pixel (``h = s·H + e``, ``w = s·W + f``,
  ``|e|, |f| ≤ 1`` give ``|h·W − w·H| = |e·W − f·H| ≤ H + W``).
"""

from __future__ import annotations

import numpy as np

RESIZE_MODES = ("none", "bilinear")
"""``none``: the unary must have the image's size; ``bilinear``: resize it (see module doc)."""


def aspect_matches(size: tuple[int, int], image_hw: tuple[int, int]) -> bool:
    """Whether ``size`` ``(h, w)`` has the aspect ratio of ``image_hw`` ``(H, W)`` within the
    rounding of a resize: ``|h·W − w·H| ≤ H + W``; False for an empty ``size``."""
    h, w = size
    height, width = image_hw
    return h > 0 and w > 0 and abs(h * width - w * height) <= height + width


def resize_logits(logits: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """``logits`` ``[C,h,w]`` (any real dtype) resized to ``[C,H,W] float32`` bilinearly, as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` resizes them;
    ``h`` and ``w`` may each be smaller or larger than ``H`` and ``W``. Always a new array.
    Raises ``ValueError`` for a shape that is not ``[C,h,w]`` with ``h, w ≥ 1``."""
    if np.ndim(logits) != 3 or 0 in np.shape(logits)[1:]:
        raise ValueError(f"logits must be [C,h,w] with h, w ≥ 1, got shape {np.shape(logits)}")
    values = np.array(logits, dtype=np.float32)  # a copy: never shares memory with logits
    height, width = image_hw
    return _linear_axis(_linear_axis(values, 1, height), 2, width)


def resize_labels(labels: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """A label map ``labels`` ``[h,w]`` resized to ``[H,W]`` (same dtype) by nearest
    neighbour: output pixel ``(i, j)`` is source pixel ``(⌊(i + ½)·h/H⌋, ⌊(j + ½)·w/W⌋)``."""
    height, width = image_hw
    rows = _nearest_indices(height, labels.shape[0])
    cols = _nearest_indices(width, labels.shape[1])
    return labels[rows[:, None], cols[None, :]]


def _linear_axis(values: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``values`` (float32) interpolated linearly along ``axis`` to ``size`` samples; the
    array itself where the axis has that size already."""
    length = values.shape[axis]
    if length == size:
        return values
    low, high, weight = _linear_taps(size, length)
    shape = [1] * values.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    resized = np.take(values, low, axis=axis)  # a new array: changed in place below
    resized *= 1 - weight
    resized += np.take(values, high, axis=axis) * weight
    return resized


def _linear_taps(size: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``size`` output samples of an axis of ``length``: the two source indices of each
    (``[size] intp``) and the weight of the second (``[size] float32``). Source coordinate
    ``(i + 0.5)·length/size − 0.5``, clamped below at 0; the second index clamped at the end."""
    source = np.maximum((np.arange(size) + 0.5) * (length / size) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.intp), length - 1)
    high = np.minimum(low + 1, length - 1)
    return low, high, (source - low).astype(np.float32)


def _nearest_indices(size: int, length: int) -> np.ndarray:
    """``[size] intp``: ``⌊(i + ½)·length/size⌋`` for each output index ``i`` (below
    ``length``)."""
    return ((2 * np.arange(size, dtype=np.int64) + 1) * length // (2 * size)).astype(np.intp)
