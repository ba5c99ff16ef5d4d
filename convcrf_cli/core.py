"""The library entry point: ``refine(image, logits, params, device)`` (README, "The algorithm").

Normalises array layouts, checks shapes, dtypes and values, and hands batched arrays (image
``[N,F,H,W]``, logits ``[N,C,H,W]``, dtypes as given) to a backend, which converts them to
float32. It converts nothing else: logits are class scores whose softmax is the unary's
distribution (see :mod:`convcrf_cli.unary` for probabilities and energies).
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from convcrf_cli.backends import Array, Backend, array_library, select_backend
from convcrf_cli.grid import for_size
from convcrf_cli.params import FLOAT32_MAX, CRFParams


class InputError(ValueError):
    """Inputs of ``refine`` have the wrong shape, type or values."""


def refine(
    image: Array,
    logits: Array,
    params: CRFParams | None = None,
    device: str | Backend = "cpu",
    *,
    check_finite: bool = True,
) -> Array:
    """Refine class scores with ConvCRF mean-field inference.

    image: ``[H,W,F]`` or ``[H,W]`` (batched: ``[N,H,W,F]`` or ``[N,H,W]``), any real dtype,
        raw value range (0–255 for 8-bit RGB).
    logits: ``[C,H,W]`` (batched: ``[N,C,H,W]``) real class scores.
    Both: NumPy arrays (or nested lists), torch tensors, or on the GPU CuPy arrays.
    params: :class:`CRFParams` (defaults when None).
    device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``, a ``torch.device`` or a backend
        instance.
    check_finite: refuse values that are not finite in float32 (NaN, infinite, beyond
        ±3.4e38) in ``image`` or ``logits`` with an :class:`InputError` (one pass over each;
        False skips it for inputs already checked).

    Returns the final Q of the mean field as ``[C,H,W]`` (``[N,C,H,W]``) float32 scores:
    labels are its argmax over classes, probabilities its softmax. NumPy on the CPU backend;
    the CUDA backend returns device arrays when given them.

    Raises :class:`InputError` for shapes, dtypes or values that do not fit, and for scores
    that would hold NaN or infinite values (never returned): from finite inputs, weights and
    compatibilities far beyond the usual overflow float32. ``TypeError``
    for ``params`` or ``device`` of the wrong type, and
    :class:`~convcrf_cli.backends.DeviceError` for a device that cannot be used.
    """
    params = _checked_params(params)
    backend = _backend(device)
    image, logits = _array(image, "image"), _array(logits, "logits")
    if _ndim(logits) not in (3, 4):
        raise InputError(f"logits must be [C,H,W] or [N,C,H,W], got shape {_shape(logits)}")
    batched = _ndim(logits) == 4
    image_nfhw, logits_nchw = _batch_layout(image, logits, batched)
    params = for_size(params, *_shape(logits_nchw)[2:])
    if check_finite:
        for name, array in (("image", image), ("logits", logits)):
            if not _finite_in_float32(array):
                raise InputError(
                    f"{name} hold NaN, infinite values or values beyond the float32 range"
                )
    scores = backend.run(image_nfhw, logits_nchw, params)
    if not _all_finite(scores):
        raise InputError(
            "the mean field gave NaN or infinite scores: from finite inputs, weight, "
            "pos_compat, col_compat or unary_weight so large for these logits overflow float32"
        )
    return scores if batched else scores[0]


def _checked_params(params: object) -> CRFParams:
    if params is None:
        return CRFParams()
    if not isinstance(params, CRFParams):
        hint = "; give the device as device=..." if isinstance(params, str) else ""
        raise TypeError(f"params must be a CRFParams or None, got {type(params).__name__}{hint}")
    return params


def _backend(device: object) -> Backend:
    """The backend of a device string, a ``torch.device`` or a backend instance."""
    if type(device).__module__ == "torch" and type(device).__name__ == "device":
        device = str(device)
    if isinstance(device, str):
        return select_backend(device)
    if not callable(getattr(device, "run", None)):
        raise TypeError(
            f"device must be 'cpu', 'cuda', 'cuda:N', 'auto' or a backend, got {device!r}"
        )
    return device


def _array(array: object, name: str):
    """``array`` as an array of real numbers: a NumPy array (lists and scalars converted),
    a torch tensor (bfloat16 as float32) or a CuPy array; anything else is an InputError."""
    library = array_library(array)
    if library == "torch":
        import torch

        if array.is_complex():
            raise InputError(f"{name} must hold real numbers, got {array.dtype}")
        return array.float() if array.dtype == torch.bfloat16 else array
    if library != "cupy":
        try:
            array = np.asarray(array)
        except ValueError as exc:  # ragged nested lists
            raise InputError(f"{name} is not a rectangular array ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _finite_in_float32(array) -> bool:
    """Whether every value of a NumPy, CuPy or torch array is finite in float32 (computed
    where the array is; integers always are)."""
    if array_library(array) == "torch":
        import torch

        if not array.is_floating_point():
            return True
        largest = torch.finfo(array.dtype).max
    else:
        if array.dtype.kind != "f":
            return True
        largest = float(np.finfo(array.dtype).max)
    # float16's own largest value: FLOAT32_MAX compared in float16 would be inf
    limit = min(largest, FLOAT32_MAX)
    with _on_its_device(array):
        return bool((abs(array) <= limit).all())  # False for NaN too


def _all_finite(scores: Array) -> bool:
    """Whether float32 ``scores`` (NumPy, CuPy or torch) hold no NaN or infinite value,
    computed where they are by their own library's ``isfinite``."""
    library = sys.modules[array_library(scores)]
    with _on_its_device(scores):
        return bool(library.isfinite(scores).all())


def _on_its_device(array) -> contextlib.AbstractContextManager:
    """For a CuPy array, its device as CuPy's current device while the context lasts (CuPy
    runs an operation on the current device, and fails on an array of another device
    without peer access); for other arrays, nothing."""
    return array.device if array_library(array) == "cupy" else contextlib.nullcontext()


def _ndim(array) -> int:
    return len(_shape(array))


def _shape(array) -> tuple[int, ...]:
    return tuple(int(n) for n in getattr(array, "shape", np.shape(array)))


def _batch_layout(image, logits, batched: bool):
    """Return ``image [N,F,H,W]`` and ``logits [N,C,H,W]`` views (same array library);
    messages quote the shapes as given."""
    image_shape, logits_shape = _shape(image), _shape(logits)
    image_forms = "[N,H,W] or [N,H,W,F]" if batched else "[H,W] or [H,W,F]"
    if len(image_shape) - batched not in (2, 3):
        raise InputError(
            f"image must be {image_forms} for logits of shape {logits_shape}, "
            f"got shape {image_shape}"
        )
    if not batched:
        image, logits = image[None], logits[None]
    if len(_shape(image)) == 3:
        image = image[..., None]
    n, height, width, features = _shape(image)
    _, classes, logits_h, logits_w = _shape(logits)
    if batched and n != _shape(logits)[0]:
        raise InputError(
            f"image batch {n} and logits batch {_shape(logits)[0]} differ (image shape "
            f"{image_shape} read as {image_forms}, logits {logits_shape} as [N,C,H,W])"
        )
    if (height, width) != (logits_h, logits_w):
        raise InputError(
            f"image size {height}×{width} (shape {image_shape}) and logits size "
            f"{logits_h}×{logits_w} (shape {logits_shape}) differ"
        )
    if classes < 1:
        raise InputError("logits have no classes")
    if height < 1 or width < 1:
        raise InputError(f"image and logits have no pixels (size {height}×{width})")
    if features < 1:
        raise InputError(f"image has no channels (shape {image_shape})")
    return _transpose(image, (0, 3, 1, 2)), logits


def _transpose(array, axes):
    if hasattr(array, "permute"):  # torch
        return array.permute(*axes)
    return array.transpose(axes)
