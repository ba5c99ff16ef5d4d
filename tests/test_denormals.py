"""Denormal floats flushed to zero in the CPU computations, and only there."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from convcrf_cli import denormals
from convcrf_cli.backends.cpu import CPUBackend
from convcrf_cli.denormals import run_flushing_denormals

TINY = 1e-39
"""A float32 denormal (below FLT_MIN ~1.18e-38)."""

pytestmark = pytest.mark.skipif(
    not denormals.flushing_supported(), reason="this CPU cannot flush denormals"
)


def _tiny(count: int) -> torch.Tensor:
    """``[count]`` float32 denormals, made in NumPy (no torch thread touches them)."""
    return torch.from_numpy(np.full(count, TINY, np.float32))


def _nonzero_doubled(values: torch.Tensor) -> int:
    return int(torch.count_nonzero(values * 2))


def test_denormals_are_flushed_in_the_worker_and_its_intra_op_threads():
    small, large = _tiny(1), _tiny(1 << 22)  # 2^22 elements split over torch's threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        counts = run_flushing_denormals(lambda: (_nonzero_doubled(small), _nonzero_doubled(large)))
    finally:
        torch.set_num_threads(threads)
    assert counts == (0, 0)


def test_the_calling_thread_keeps_its_denormals():
    large = _tiny(1 << 22)
    run_flushing_denormals(_nonzero_doubled, large)
    assert _nonzero_doubled(large) == large.numel()
    assert (_tiny(1) * 2).item() == pytest.approx(2 * TINY, rel=1e-6)


def test_results_exceptions_thread_count_and_nested_calls():
    assert run_flushing_denormals(divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        run_flushing_denormals(divmod, 1, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_flushing_denormals(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(threads)
    assert run_flushing_denormals(run_flushing_denormals, max, 3, 4) == 4


def _child_computes() -> None:
    assert run_flushing_denormals(_nonzero_doubled, _tiny(1 << 16)) == 0


def test_a_forked_child_starts_a_worker_of_its_own():
    run_flushing_denormals(_nonzero_doubled, _tiny(1))  # the parent's worker exists
    child = multiprocessing.get_context("fork").Process(target=_child_computes)
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0  # a stale worker would hang the child (exit code None)


def test_the_cpu_backend_says_it_flushes():
    assert CPUBackend().describe().endswith(" threads, denormals flushed to zero)")
