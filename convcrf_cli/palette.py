"""The Pascal VOC colour palette: 256 RGB entries built by bit interleaving.

Entry ``i`` spreads the bits of ``i`` over the three channels, most significant first:
bit ``3j`` of ``i`` sets bit ``7 - j`` of red, bit ``3j + 1`` of green, bit ``3j + 2`` of blue.
Class 0 is black, 1 dark red ``(128, 0, 0)``, 2 dark green ``(0, 128, 0)``, 15 person
``(192, 128, 128)`` and 255 (VOC's "void") ``(224, 224, 192)``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def voc_palette() -> np.ndarray:
    """Return the VOC palette as ``[256,3] uint8``."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def palette_bytes() -> bytes:
    """The palette flattened as 768 bytes ``r0 g0 b0 r1 ...`` (what ``Image.putpalette`` takes)."""
    return voc_palette().tobytes()


def palette_png(labels: np.ndarray) -> bytes:
    """``labels`` ``[H,W]`` (integers in 0..255) as a palette PNG with this palette: the pixel
    values stay the class ids, viewers show the colours."""
    picture = Image.fromarray(np.asarray(labels).astype(np.uint8))
    picture.putpalette(palette_bytes())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
