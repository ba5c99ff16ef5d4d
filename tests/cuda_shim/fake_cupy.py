"""A stand-in for the ``cupy`` module on a machine without a GPU: "device" arrays are NumPy
arrays (of :class:`ndarray`, which reports the module ``cupy``), and ``RawModule`` builds the
kernels into the C++ shim (``launcher.build_shim``) and launches them there (or, for the
option sets a test marks :data:`rejected`, fails as NVRTC does). With it installed
as ``sys.modules["cupy"]`` (:func:`installed`), the CUDA backend's own Python code —
``CUDABackend.run``, device selection, ``convcrf info``, the benchmark script — runs unchanged
on the real ``cuda/*.cu`` kernels.

Only what the backend, ``bench/bench_gpu.py`` and ``bench/gpu_profile.py`` use is provided
(streams run launches at once; a captured graph replays what it recorded); NumPy functions
not defined here are taken from NumPy, their array results returned as :class:`ndarray`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from cuda_shim.launcher import ShimLauncher, build_shim

__version__ = "fake (C++ shim)"
float32 = np.float32
nan = np.nan
BUILD_DIR = Path(__file__).resolve().parents[1] / "_build" / "fake_cupy"
launches: list[str] = []
"""The name of every kernel launched, in order (emptied by :func:`installed`)."""
transfers: list[tuple[tuple[int, ...], str]] = []
"""(shape, dtype) of every array copied to the host with ``get`` (emptied likewise)."""
compiled: list[tuple[int, int]] = []
"""(class block, load group) of every RawModule compiled, in order (emptied likewise)."""
attempted: list[tuple[int, int]] = []
"""(class block, load group) of every RawModule asked to compile, rejected ones too (emptied
likewise)."""
rejected: set[tuple[int, int]] = set()
"""(class block, load group) of the modules NVRTC rejects: their ``compile`` raises
:class:`CompileException` with :data:`NVRTC_LOG` (a test adds them; emptied likewise)."""
NVRTC_LOG = (
    '/tmp/tmp3k1/9f2c.cubin.cu(812): warning #177-D: variable "t" was declared but never '
    "referenced\n\n"
    "/tmp/tmp3k1/9f2c.cubin.cu(840): error: too many resources requested for launch\n\n"
    '1 error detected in the compilation of "/tmp/tmp3k1/9f2c.cubin.cu".\n'
)
"""The log of a rejected module, as CuPy's message: a warning, the error, NVRTC's count."""
ATTRIBUTES = {"MaxSharedMemoryPerBlockOptin": 227 * 1024, "MultiProcessorCount": 4}
"""Device attributes the backend reads (a small device: 4 multiprocessors; Hopper's opt-in
limit of shared memory per block)."""
device_count = 1
"""The devices there are (a test sets 2 to use ``cuda:1``)."""
_current = [0]
"""The current device, last; ``with Device(i)`` pushes ``i`` while it lasts. As in CuPy,
arrays are allocated on it, and an operation or a kernel given an array of another device
fails (CuPy: no peer access; a kernel: an illegal address)."""


def _check_current(*arrays) -> None:
    """ValueError, as CuPy's without peer access, for an array not on the current device."""
    for array in arrays:
        if isinstance(array, ndarray) and array.device_id != _current[-1]:
            raise ValueError(
                f"The device where the array resides ({array.device_id}) is different from "
                f"the current device ({_current[-1]}). Peer access is unavailable between "
                "these devices."
            )


def _plain(array):
    return array.view(np.ndarray) if isinstance(array, ndarray) else array


class ndarray(np.ndarray):  # noqa: N801 (CuPy's name)
    """A "device" array: a NumPy array with CuPy's ``get`` and ``device``, on the device that
    was current where it was made (views: their base's); ufuncs, reductions, ``argmax`` and
    ``astype`` need it to be the current device."""

    __module__ = "cupy"

    def __array_finalize__(self, obj) -> None:
        self.device_id = getattr(obj, "device_id", _current[-1])

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        _check_current(*inputs, *(out or ()))
        if out:
            kwargs["out"] = tuple(_plain(array) for array in out)
        result = getattr(ufunc, method)(*map(_plain, inputs), **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def argmax(self, *args, **kwargs):
        _check_current(self)
        return super().argmax(*args, **kwargs)

    def astype(self, *args, **kwargs):
        _check_current(self)
        return super().astype(*args, **kwargs)

    def get(self) -> np.ndarray:
        transfers.append((self.shape, str(self.dtype)))
        return np.array(self, copy=True).view(np.ndarray)

    @property
    def device(self) -> _Device:
        return _Device(self.device_id)


def _device(result):
    return result.view(ndarray) if isinstance(result, np.ndarray) else result


def asarray(array, dtype=None) -> ndarray:
    """``array`` itself when it is a device array of ``dtype``, else a copy on the current
    device."""
    if isinstance(array, ndarray) and dtype in (None, array.dtype):
        return array
    _check_current(array)
    return _device(np.array(_plain(array), dtype=dtype))


def ascontiguousarray(array, dtype=None) -> ndarray:
    """As :func:`asarray`, C-contiguous."""
    if isinstance(array, ndarray) and array.flags.c_contiguous:
        return asarray(array, dtype)
    _check_current(array)
    return _device(np.ascontiguousarray(_plain(array), dtype=dtype))


def empty(shape, dtype=np.float32) -> ndarray:
    return _device(np.empty(shape, dtype))


def __getattr__(name: str):
    function = getattr(np, name)
    if not callable(function):
        return function
    return lambda *args, **kwargs: _device(function(*args, **kwargs))


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def random(self, shape, dtype=np.float64) -> ndarray:
        return _device(self.rng.random(shape, dtype=dtype))


random = types.SimpleNamespace(default_rng=_Generator)


class _Kernel:
    """A kernel of a :class:`RawModule`, launched by the shim."""

    def __init__(self, shim: ShimLauncher, name: str, device_id: int) -> None:
        self.shim, self.name, self.device_id = shim, name, device_id
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        if self.device_id != _current[-1]:
            raise RuntimeError(
                f"{self.name}: loaded on device {self.device_id}, launched on {_current[-1]} "
                "(cudaErrorInvalidResourceHandle)"
            )
        off_device = [a.device_id for a in args if isinstance(a, ndarray)]
        if any(device != _current[-1] for device in off_device):
            raise RuntimeError(f"{self.name}: an argument on another device (illegal address)")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise RuntimeError(f"{self.name}: {shared_mem} bytes of shared memory not opted in")
        if _capturing is not None:  # recorded for the graph, not run (as CUDA captures)
            _capturing.append(functools.partial(self, grid, block, args, shared_mem))
            return
        self.shim(self.name, grid, block, args, shared_mem)
        launches.append(self.name)


class RawModule:
    """The kernel source built into the shim with the ``-DCONVCRF_CLASS_BLOCK`` and
    ``-DCONVCRF_LOAD_GROUP`` of ``options`` (the source itself is the repository's ``cuda/``,
    which the backend read)."""

    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        defines = dict(re.findall(r"-D(CONVCRF_\w+)=(\d+)", " ".join(options)))
        self.class_block = int(defines["CONVCRF_CLASS_BLOCK"])
        self.load_group = int(defines["CONVCRF_LOAD_GROUP"])
        self.code, self.options = code, options
        self.shim: ShimLauncher | None = None
        self.device_id = -1

    def compile(self) -> None:
        """Build the shim; the module is loaded on the current device. A module of
        :data:`rejected` raises :class:`CompileException`, as CuPy where NVRTC fails."""
        attempted.append((self.class_block, self.load_group))
        if (self.class_block, self.load_group) in rejected:
            raise CompileException(NVRTC_LOG, self.code, "kern.cu", self.options)
        self.shim = _shim(self.class_block, self.load_group)
        self.device_id = _current[-1]
        compiled.append((self.class_block, self.load_group))

    def get_function(self, name: str) -> _Kernel:
        return _Kernel(self.shim, name, self.device_id)


class CompileException(Exception):
    """CuPy's ``cupy.cuda.compiler.CompileException``: its message is the compiler's log."""

    def __init__(self, msg: str, source: str, name: str, options, backend: str = "nvrtc") -> None:
        self._msg, self.source, self.name, self.options = msg, source, name, options
        self.backend = backend
        super().__init__()

    def __str__(self) -> str:
        return self._msg


@functools.cache
def _shim(class_block: int, load_group: int) -> ShimLauncher:
    """The shim built once per class block and load group for the whole test session."""
    return ShimLauncher(build_shim(BUILD_DIR, class_block, load_group=load_group))


class _Event:
    def __init__(self) -> None:
        self.seconds = 0.0

    def record(self) -> None:
        self.seconds = time.perf_counter()

    def synchronize(self) -> None:
        """Launches run synchronously in the shim."""


def _get_elapsed_time(start: _Event, stop: _Event) -> float:
    return (stop.seconds - start.seconds) * 1e3


_capturing: list | None = None
"""The launches a capturing :class:`_Stream` has recorded, or None when none captures."""


class _Graph:
    """A captured CUDA graph: ``launch`` runs the recorded launches again, in order."""

    def __init__(self, recorded: list) -> None:
        self.recorded = recorded

    def launch(self, stream=None) -> None:
        for launch in self.recorded:
            launch()


class _Stream:
    """A stream (launches run synchronously in the shim) that can capture a graph; CuPy's
    ``non_blocking`` is accepted and means nothing here."""

    def __init__(self, non_blocking: bool = False) -> None:
        del non_blocking

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def synchronize(self) -> None:
        """Launches run synchronously in the shim."""

    def begin_capture(self) -> None:
        global _capturing
        _capturing = []

    def end_capture(self) -> _Graph:
        global _capturing
        graph, _capturing = _Graph(_capturing), None
        return graph


class _Device:
    def __init__(self, index: int = 0) -> None:
        self.id = index
        self.attributes = dict(ATTRIBUTES)

    def synchronize(self) -> None:
        """Launches run synchronously in the shim."""

    def __enter__(self):
        if not 0 <= self.id < device_count:
            raise RuntimeError(f"no device {self.id}")
        _current.append(self.id)
        return self

    def __exit__(self, *exc) -> None:
        _current.pop()


cuda = types.SimpleNamespace(
    Device=_Device,
    Event=_Event,
    Stream=_Stream,
    get_elapsed_time=_get_elapsed_time,
    get_current_stream=contextlib.nullcontext,
    compiler=types.SimpleNamespace(CompileException=CompileException),
    runtime=types.SimpleNamespace(
        getDeviceCount=lambda: device_count,
        deviceSynchronize=lambda: None,  # launches run synchronously in the shim
        getDeviceProperties=lambda index: {
            "name": b"C++ shim of the CUDA kernels",
            "major": 0,
            "minor": 0,
            "totalGlobalMem": 0,
        },
    ),
)


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """This module as ``cupy`` while the context lasts, with the CUDA backend's per-process
    caches (compiled and rejected modules, device attributes, plans, tuned variants, whether
    the module's mean field can run fused) and :data:`rejected` emptied on entry and on exit."""
    from convcrf_cli.backends import cuda as backend
    from convcrf_cli.backends import cuda_autograd

    caches = [
        backend.cuda_unavailable_reason,
        backend._compiled_module,
        backend._unbuilt_modules,
        backend._device_launch_config,
        backend._cached_plan,
        backend.module_launcher,
        backend.device_properties,
        backend._tuning_key,
        backend._tuned_variants,
        cuda_autograd.fused_available,
    ]
    global _capturing
    previous = sys.modules.get("cupy")
    _clear(caches)
    _capturing = None
    _current[:] = [0]
    launches.clear()
    transfers.clear()
    compiled.clear()
    attempted.clear()
    rejected.clear()
    sys.modules["cupy"] = sys.modules[__name__]
    try:
        yield sys.modules[__name__]
    finally:
        if previous is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = previous
        rejected.clear()
        _clear(caches)


def _clear(caches: list) -> None:
    for cache in caches:
        (cache.clear if isinstance(cache, dict) else cache.cache_clear)()
