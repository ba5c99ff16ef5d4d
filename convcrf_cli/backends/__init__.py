"""Backends run the mean-field kernels; ``select_backend`` maps a device string to one.

A backend implements ``run(image, logits, params) -> scores`` on batched arrays:
``image [N,F,H,W]``, ``logits [N,C,H,W]`` (any real dtype and strides; the backend converts
them to contiguous float32) -> ``scores [N,C,H,W] float32``. The CPU backend returns NumPy
arrays; the CUDA backend also takes device arrays (CuPy, torch CUDA) and returns the scores as
the kind of array the logits are (CuPy, a torch tensor on the logits' device, or NumPy).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias

import numpy as np

from convcrf_cli.params import CRFParams

Array: TypeAlias = Any
"""A NumPy array, a torch tensor or a CuPy array (nested lists too where NumPy takes them)."""


def array_library(array: object) -> str:
    """The library an array belongs to, by its type's top-level module: ``"numpy"``,
    ``"cupy"``, ``"torch"`` (anything else, e.g. a list, is reported as its module)."""
    return type(array).__module__.split(".")[0]


class DeviceError(RuntimeError):
    """The requested device cannot be used (no CUDA backend, no such GPU, bad device string)."""


class Backend(Protocol):
    """What :func:`select_backend` returns and :func:`convcrf_cli.refine` accepts as
    ``device``; ``name`` is ``"cpu"`` or ``"cuda"``."""

    name: str

    def run(self, image: Array, logits: Array, params: CRFParams) -> Array:
        """Mean-field inference on ``image [N,F,H,W]`` and ``logits [N,C,H,W]`` (real
        dtypes) -> scores ``[N,C,H,W] float32``."""


def parse_device(device: str) -> tuple[str, int]:
    """Split ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into (kind, index)."""
    text = device.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def select_backend(device: str = "auto", tune: bool = True) -> Backend:
    """Return the backend for ``device``; ``auto`` is CUDA when usable, else the CPU.
    ``tune``: the CUDA backend times its launch variants per batch shape (``CUDABackend``)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        from convcrf_cli.backends.cpu import CPUBackend

        return CPUBackend()
    try:
        from convcrf_cli.backends.cuda import CUDABackend, cuda_unavailable_reason
    except ImportError as exc:  # the CUDA backend module itself is missing
        reason = f"CUDA backend not available ({exc})"
    else:
        reason = cuda_unavailable_reason(index)
        if reason is None:
            return CUDABackend(index, tune=tune)
    if kind == "auto":
        from convcrf_cli.backends.cpu import CPUBackend

        return CPUBackend(fallback_reason=reason)
    raise DeviceError(f"cannot use device {device!r}: {reason}")


def as_numpy(array: Array) -> np.ndarray:
    """A NumPy array of the same shape and dtype: a NumPy array itself, else a host copy of a
    CPU torch tensor or a device array."""
    if hasattr(array, "get"):  # CuPy
        return array.get()
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):  # torch
        return array.detach().cpu().numpy()
    return np.asarray(array)
