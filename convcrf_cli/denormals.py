"""Run CPU computations with denormal floats flushed to zero, without changing the caller.

Mean-field inference on confident unaries produces many float32 values below ``FLT_MIN``
(~1.2e-38): probabilities ``exp(z - max)`` of hopeless classes, colour weights of distant
neighbours and their products. On many x86 CPUs arithmetic on such denormal numbers is tens of
times slower, which made refinement of realistic inputs 2-3x slower than that of random ones.
Flushing them to zero changes every result by less than 1e-37 in absolute value.

The flush mode (FTZ/DAZ) is a per-thread CPU setting. :func:`run_flushing_denormals` runs its
function in the calling thread with the mode set there and in every thread of the calling
thread's OpenMP team (torch's intra-op threads), and puts back each thread's own mode when it
returns. It reaches those threads through ``GOMP_parallel`` of the OpenMP runtime torch loaded.
Computing in the caller's team, not in a thread of its own, matters: a second OpenMP team makes
the runtime see more threads than CPUs and stop its threads spinning between parallel regions,
which made the many short torch operations of the mean field 2x slower as soon as the calling
program had used torch itself.

Where that runtime cannot be reached (no ``/proc/self/maps``, another threading library), and in
a forked child (whose copy of the forking thread's team is stale), the function runs in one
dedicated worker thread that sets the mode before its first torch operation, so the intra-op
threads it starts inherit it. Where the CPU cannot flush denormals (``torch.set_flush_denormal``
returns False) the function runs in the calling thread as is.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from convcrf_cli import forks

Result = TypeVar("Result")

OPENMP_LIBRARIES = ("libgomp", "libiomp5", "libomp")
"""File-name prefixes of the OpenMP runtimes that export ``GOMP_parallel`` (GNU, Intel, LLVM)."""

_TEAM_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_lock = threading.Lock()
_supported: bool | None = None
_team: _OpenMPTeam | None = None
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_thread = threading.local()


def run_flushing_denormals(
    function: Callable[..., Result], *args: object, **kwargs: object
) -> Result:
    """``function(*args, **kwargs)`` with denormal floats flushed to zero on the CPU.

    Runs in the calling thread and its torch threads (in the fallback worker thread, with the
    caller's number of torch threads, where those cannot be reached); exceptions propagate. A
    call made while flushing (a nested call) runs directly.
    """
    if getattr(_thread, "flushing", False):
        return function(*args, **kwargs)
    if not flushing_supported():
        return function(*args, **kwargs)
    if _team is not None:
        return _in_calling_team(_team, function, args, kwargs)
    threads = torch.get_num_threads()
    return _worker().submit(_with_threads, threads, function, args, kwargs).result()


class _OpenMPTeam:
    """The OpenMP runtime torch uses: runs a Python function once on every thread of the
    calling thread's team (``GOMP_parallel``), the threads torch's parallel operations use."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._parallel = library.GOMP_parallel
        self._parallel.argtypes = [_TEAM_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None

    def on_each_thread(self, threads: int, function: Callable[[], None]) -> None:
        """Call ``function()`` once in each of the ``threads`` threads of the caller's team."""
        errors: list[BaseException] = []

        def run(_: int | None) -> None:
            try:
                function()
            except BaseException as exc:  # a ctypes callback cannot raise: re-raised below
                errors.append(exc)

        callback = _TEAM_CALLBACK(run)
        self._parallel(callback, None, threads, 0)
        if errors:
            raise errors[0]


def _in_calling_team(
    team: _OpenMPTeam, function: Callable[..., Result], args: tuple, kwargs: dict
) -> Result:
    """``function`` in the calling thread with its team flushing, each thread's mode restored."""
    threads = torch.get_num_threads()
    previous: dict[int, bool] = {}

    def flush() -> None:
        previous[threading.get_native_id()] = _flushing_here()
        torch.set_flush_denormal(True)

    def restore() -> None:
        torch.set_flush_denormal(previous.get(threading.get_native_id(), False))

    team.on_each_thread(threads, flush)
    _thread.flushing = True
    try:
        return function(*args, **kwargs)
    finally:
        _thread.flushing = False
        # threads that joined the team meanwhile (more torch threads) started flushing: off
        team.on_each_thread(max(threads, torch.get_num_threads()), restore)


def _flushing_here() -> bool:
    """Whether the current thread flushes denormal results to zero (1e-30 · 1e-10 in float32)."""
    return bool(np.float32(1e-30) * np.float32(1e-10) == 0)


def flushing_supported() -> bool:
    """Whether this CPU flushes denormals in :func:`run_flushing_denormals`; the first call
    also finds the way (the caller's team through the OpenMP runtime, else the worker; always
    the worker in a forked child, see :mod:`convcrf_cli.forks`)."""
    global _supported, _team
    with _lock:
        if _supported is None:
            flushing = _flushing_here()
            _supported = bool(torch.set_flush_denormal(True))
            torch.set_flush_denormal(flushing)
            _team = _find_openmp_team() if _supported and not forks.forked else None
        return _supported


def _find_openmp_team() -> _OpenMPTeam | None:
    """The OpenMP runtime loaded in this process (torch's own first), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    except OSError:
        return None
    torch_dir = Path(torch.__file__).parent
    candidates = sorted(
        (path for path in paths if Path(path).name.startswith(OPENMP_LIBRARIES)),
        key=lambda path: torch_dir not in Path(path).parents,
    )
    for path in candidates:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(library, "GOMP_parallel"):
            return _OpenMPTeam(library)
    return None


def _with_threads(threads: int, function: Callable[..., Result], args, kwargs) -> Result:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return function(*args, **kwargs)


def _worker() -> concurrent.futures.ThreadPoolExecutor:
    """The fallback's single worker thread, started on first use with the flush mode set."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="convcrf-flush-denormals"
            )
            _executor.submit(_enter_worker).result()
        return _executor


def _enter_worker() -> None:
    """Set the flush mode in the worker thread (before it starts any torch thread)."""
    _thread.flushing = True
    torch.set_flush_denormal(True)


def _after_fork_in_child() -> None:
    """A forked child uses a worker thread of its own: the parent's worker is gone, and the
    OpenMP team of the thread that forked is a stale copy (GNU OpenMP hangs on its next
    parallel region), which a new thread does not share."""
    global _lock, _executor, _team
    _lock, _executor, _team = threading.Lock(), None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
