"""Denormal floats flushed to zero in the CPU computations, and only there."""

from __future__ import annotations

import pytest
import torch

from convcrf_cli import denormals
from convcrf_cli.denormals import run_flushing_denormals

TINY = 1e-39
"""A float32 denormal (below FLT_MIN ~1.18e-38)."""

pytestmark = pytest.mark.skipif(
    denormals._flushing_executor() is None, reason="this CPU cannot flush denormals"
)


def _doubled(count: int) -> torch.Tensor:
    return torch.full((count,), TINY, dtype=torch.float32) * 2


def test_denormals_are_flushed_in_the_worker_and_its_intra_op_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # one element runs on the worker itself; 2^22 are split over torch's intra-op threads
        small, large = run_flushing_denormals(lambda: (_doubled(1), _doubled(1 << 22)))
    finally:
        torch.set_num_threads(threads)
    assert small.item() == 0.0
    assert not large.any()


def test_the_calling_thread_keeps_its_denormals():
    run_flushing_denormals(_doubled, 1)
    assert _doubled(1).item() == pytest.approx(2 * TINY, rel=1e-6)
    assert bool((_doubled(1 << 22) > 0).all())


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
