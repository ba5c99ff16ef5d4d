"""Denormal floats flushed to zero in the CPU computations, and only there."""

from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

from convcrf_cli import denormals
from convcrf_cli.backends.cpu import CPUBackend
from convcrf_cli.denormals import run_flushing_denormals
from convcrf_cli.params import CRFParams

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


@pytest.fixture(params=["calling team", "worker thread"])
def way(request, monkeypatch):
    """Each way of flushing: the calling thread's OpenMP team, and the fallback worker."""
    denormals.flushing_supported()  # finds the team
    if request.param == "worker thread":
        monkeypatch.setattr(denormals, "_team", None)
    elif denormals._team is None:
        pytest.skip("torch's OpenMP runtime is not reachable here")
    return request.param


def test_the_calling_team_is_found_where_torch_uses_openmp():
    if not os.path.exists("/proc/self/maps") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("no /proc/self/maps or torch without OpenMP")
    assert denormals.flushing_supported() and denormals._team is not None


def test_denormals_are_flushed_in_the_computation_and_its_intra_op_threads(way):
    small, large = _tiny(1), _tiny(1 << 22)  # 2^22 elements split over torch's threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _nonzero_doubled(large)  # the calling thread's own team exists already
        counts = run_flushing_denormals(lambda: (_nonzero_doubled(small), _nonzero_doubled(large)))
    finally:
        torch.set_num_threads(threads)
    assert counts == (0, 0)


def test_the_calling_thread_and_its_team_keep_their_own_mode(way):
    large = _tiny(1 << 22)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_flushing_denormals(_nonzero_doubled, large)
        assert _nonzero_doubled(large) == large.numel()
        assert (_tiny(1) * 2).item() == pytest.approx(2 * TINY, rel=1e-6)
        torch.set_flush_denormal(True)  # a caller that flushes already still does afterwards
        try:
            run_flushing_denormals(_nonzero_doubled, large)
            assert (_tiny(1) * 2).item() == 0
        finally:
            torch.set_flush_denormal(False)
    finally:
        torch.set_num_threads(threads)


def test_an_error_on_a_team_thread_is_raised_in_the_caller():
    if denormals._team is None:
        pytest.skip("torch's OpenMP runtime is not reachable here")

    def fail() -> None:
        raise ValueError("on a team thread")

    with pytest.raises(ValueError, match="on a team thread"):
        denormals._team.on_each_thread(2, fail)


def test_results_exceptions_thread_count_and_nested_calls(way):
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


def test_a_forked_child_starts_a_worker_of_its_own(way):
    run_flushing_denormals(_nonzero_doubled, _tiny(1))  # the parent's team or worker exists
    child = multiprocessing.get_context("fork").Process(target=_child_computes)
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0  # a stale worker would hang the child (exit code None)


def _child_computes_in_parallel() -> None:
    assert run_flushing_denormals(_nonzero_doubled, _tiny(1 << 22)) == 0


def test_a_child_forked_before_its_parent_flushed_does_not_use_the_stale_team(monkeypatch):
    """The child finds the way itself: the forking thread's team it inherits is stale."""
    monkeypatch.setattr(denormals, "_supported", None)  # the parent has not flushed yet
    monkeypatch.setattr(denormals, "_team", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _nonzero_doubled(_tiny(1 << 22))  # the forking thread's team exists
        child = multiprocessing.get_context("fork").Process(target=_child_computes_in_parallel)
        child.start()
        child.join(timeout=60)
    finally:
        torch.set_num_threads(threads)
    if child.exitcode is None:
        child.kill()
        child.join()
    assert child.exitcode == 0  # GNU OpenMP hung on the stale team (exit code None)


def test_the_cpu_backend_says_it_flushes():
    assert CPUBackend().describe().endswith(" threads, denormals flushed to zero)")


def test_concurrent_callers_each_flush_and_get_the_same_numbers(way):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 3, 60, 80)).astype(np.float32)
    logits = rng.normal(0, 8, (1, 6, 60, 80)).astype(np.float32)  # confident scores
    params = CRFParams(filter_size=7, blur=2)
    want = CPUBackend().run(image, logits, params)
    results: list[np.ndarray] = []

    def refine_and_probe() -> None:
        for _ in range(3):
            results.append(CPUBackend().run(image, logits, params))
        results.append(run_flushing_denormals(_nonzero_doubled, _tiny(1 << 20)))

    callers = [threading.Thread(target=refine_and_probe) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=120)
    assert not any(caller.is_alive() for caller in callers)
    scores = [r for r in results if isinstance(r, np.ndarray)]
    assert len(scores) == 12 and all(np.array_equal(s, want) for s in scores)
    assert [r for r in results if not isinstance(r, np.ndarray)] == [0, 0, 0, 0]


def test_threads_a_computation_adds_to_the_team_do_not_flush_afterwards():
    if denormals._team is None:
        pytest.skip("torch's OpenMP runtime is not reachable here")
    large = _tiny(1 << 22)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)

        def grow_the_team() -> int:
            torch.set_num_threads(4)  # threads started now inherit the flushing mode
            return _nonzero_doubled(large)

        run_flushing_denormals(grow_the_team)
        assert _nonzero_doubled(large) == large.numel()  # all four threads keep denormals
    finally:
        torch.set_num_threads(threads)
