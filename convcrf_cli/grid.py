"""Geometry of the coarse grid that message passing runs on (step 2 of README's "The
algorithm"): its size and the pooling padding, for the mean field, the CUDA launch plans and
the memory estimate."""

from __future__ import annotations

import math

from convcrf_cli.params import CRFParams


def pool_padding(length: int, blur: int) -> int:
    """Padding on each side of an axis of ``length`` pixels for pooling by ``blur`` (step 2)."""
    return math.ceil(((blur - length % blur) % blur) / 2)


def coarse_size(length: int, blur: int) -> int:
    """Length of the coarse grid: ``ceil(length / blur)``."""
    return -(-length // blur)


def for_size(params: CRFParams, height: int, width: int) -> CRFParams:
    """``params`` with ``blur`` at most ``max(height, width)``, which gives the same result.

    From there on every blur pools the whole image into one cell and upsamples that cell's
    message to a constant, but the pooling-phase layout (:mod:`convcrf_cli.phases`) holds
    ``blur²`` phases: ``blur`` 10⁶ on a small image took minutes and gigabytes.
    """
    largest = max(height, width)
    return params if params.blur <= largest else params.replace(blur=largest)
