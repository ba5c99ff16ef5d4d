"""CPU backend: the PyTorch implementation of :mod:`convcrf_cli.meanfield`, vectorised over
pixels and classes and multi-threaded by torch's intra-op thread pool, with denormal floats
flushed to zero (:mod:`convcrf_cli.denormals`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from convcrf_cli import meanfield
from convcrf_cli.backends import Array, as_numpy
from convcrf_cli.denormals import flushing_supported, run_flushing_denormals
from convcrf_cli.params import CRFParams


class CPUBackend:
    """The PyTorch backend (see the module docstring); ``fallback_reason`` is set when
    ``--device auto`` chose it because CUDA could not be used."""

    name = "cpu"

    def __init__(self, fallback_reason: str | None = None) -> None:
        self.fallback_reason = fallback_reason
        """Why ``auto`` chose the CPU (None when the CPU was asked for)."""

    def describe(self) -> str:
        """One line for ``-v``: torch's version, its threads, whether denormals are flushed."""
        flush = ", denormals flushed to zero" if flushing_supported() else ""
        return f"cpu (torch {torch.__version__}, {torch.get_num_threads()} threads{flush})"

    def run(self, image: Array, logits: Array, params: CRFParams) -> np.ndarray:
        """``image [N,F,H,W]``, ``logits [N,C,H,W]`` -> scores ``[N,C,H,W] float32`` (NumPy)."""
        image_t = torch.from_numpy(np.ascontiguousarray(as_numpy(image), dtype=np.float32))
        logits_t = torch.from_numpy(np.ascontiguousarray(as_numpy(logits), dtype=np.float32))
        with allocation_failures_as_memory_errors():
            return run_flushing_denormals(mean_field_scores, image_t, logits_t, params)


_CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"
"""What torch's RuntimeError says when the CPU allocator fails (e.g. under ``ulimit -v``)."""


@contextlib.contextmanager
def allocation_failures_as_memory_errors() -> Iterator[None]:
    """Raise the RuntimeError of torch's CPU allocator failing, which has no MemoryError of
    its own, as a MemoryError (the commands report it as running out of memory)."""
    try:
        yield
    except RuntimeError as exc:
        if _CPU_ALLOCATION_FAILED in str(exc):
            raise MemoryError(str(exc)) from exc
        raise


def mean_field_scores(image: torch.Tensor, logits: torch.Tensor, params: CRFParams) -> np.ndarray:
    """``image [N,F,H,W]``, ``logits [N,C,H,W]`` float32 -> scores ``[N,C,H,W] float32``, in
    the calling thread (:meth:`CPUBackend.run` calls it with denormals flushed)."""
    with torch.no_grad():
        kernel = meanfield.crf_kernel(image, params)
        scores = meanfield.mean_field(logits, kernel, params)
    return scores.contiguous().numpy()
