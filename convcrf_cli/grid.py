"""Geometry of the coarse grid that message passing runs on (step 2 of README's "The
algorithm"): its size and the pooling padding, for the mean field, the CUDA launch plans and
the memory estimate."""

from __future__ import annotations

import math


def pool_padding(length: int, blur: int) -> int:
    """Padding on each side of an axis of ``length`` pixels for pooling by ``blur`` (step 2)."""
    return math.ceil(((blur - length % blur) % blur) / 2)


def coarse_size(length: int, blur: int) -> int:
    """Length of the coarse grid: ``ceil(length / blur)``."""
    return -(-length // blur)
