"""The library entry point: ``refine(image, logits, params, device)`` (DESIGN §2).

Normalises array layouts, checks shapes and values, and hands batched float32 arrays to a
backend. It converts nothing else: logits are class scores whose softmax is the unary's
distribution (see :mod:`convcrf_cli.unary` for probabilities and energies).
"""

from __future__ import annotations

import numpy as np

from convcrf_cli.backends import Backend, select_backend
from convcrf_cli.params import CRFParams


class InputError(ValueError):
    """Inputs of ``refine`` have the wrong shape, type or values."""


def refine(
    image,
    logits,
    params: CRFParams | None = None,
    device: str | Backend = "cpu",
    *,
    check_finite: bool = True,
):
    """Refine class scores with ConvCRF mean-field inference.

    image: ``[H,W,F]`` or ``[H,W]`` (batched: ``[N,H,W,F]`` or ``[N,H,W]``), any real dtype,
        raw value range (0–255 for 8-bit RGB).
    logits: ``[C,H,W]`` (batched: ``[N,C,H,W]``) float class scores.
    params: :class:`CRFParams` (defaults when None).
    device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a backend instance.
    check_finite: refuse NaN or infinite values in ``image`` or ``logits`` with an
        :class:`InputError` (one pass over each; False skips it for inputs already checked).

    Returns the final Q of the mean field as ``[C,H,W]`` (``[N,C,H,W]``) float32 scores:
    labels are its argmax over classes, probabilities its softmax. NumPy on the CPU backend;
    the CUDA backend returns device arrays when given them.
    """
    params = params or CRFParams()
    backend = select_backend(device) if isinstance(device, str) else device
    batched = _ndim(logits) == 4
    if _ndim(logits) not in (3, 4):
        raise InputError(f"logits must be [C,H,W] or [N,C,H,W], got shape {_shape(logits)}")
    image_nfhw, logits_nchw = _batch_layout(image, logits, batched)
    if check_finite:
        for name, array in (("image", image), ("logits", logits)):
            if not _all_finite(array):
                raise InputError(f"{name} hold NaN or infinite values")
    scores = backend.run(image_nfhw, logits_nchw, params)
    return scores if batched else scores[0]


def _all_finite(array) -> bool:
    """Whether every value of a NumPy, CuPy or torch array is finite (computed where it is)."""
    library = type(array).__module__.split(".")[0]
    if library == "torch":
        import torch

        return bool(torch.isfinite(array).all())
    if library == "cupy":
        import cupy

        return bool(cupy.isfinite(array).all())
    return bool(np.isfinite(np.asarray(array)).all())


def _ndim(array) -> int:
    return len(_shape(array))


def _shape(array) -> tuple[int, ...]:
    return tuple(int(n) for n in getattr(array, "shape", np.shape(array)))


def _batch_layout(image, logits, batched: bool):
    """Return ``image [N,F,H,W]`` and ``logits [N,C,H,W]`` views (same array library)."""
    image_shape, logits_shape = _shape(image), _shape(logits)
    if not batched:
        image, logits = image[None], logits[None]
        image_shape, logits_shape = (1, *image_shape), (1, *logits_shape)
    if len(image_shape) == 3:
        image = image[..., None]
        image_shape = (*image_shape, 1)
    if len(image_shape) != 4:
        raise InputError(f"image must be [H,W] or [H,W,F], got shape {_shape(image)}")
    n, height, width, _ = image_shape
    if logits_shape[0] != n or logits_shape[2:] != (height, width):
        raise InputError(
            f"image {image_shape[1:3]} and logits {logits_shape[2:]} sizes differ"
            + (f" (batch {n} vs {logits_shape[0]})" if logits_shape[0] != n else "")
        )
    if logits_shape[1] < 1:
        raise InputError("logits have no classes")
    return _transpose(image, (0, 3, 1, 2)), logits


def _transpose(array, axes):
    if hasattr(array, "permute"):  # torch
        return array.permute(*axes)
    return array.transpose(axes)
