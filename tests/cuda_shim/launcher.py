"""Build the CPU shim of the CUDA kernels and launch them from Python like CuPy would.

``build_shim(out_dir, class_block)`` compiles ``kernels_driver.cpp`` (which includes the
unmodified ``cuda/*.cu``) with g++ into a shared library; ``ShimLauncher`` is a ``launch``
callable for :func:`convcrf_cli.backends.cuda.run_plan` that runs on NumPy arrays.
``build_shim(..., sanitizer="thread" | "address")`` builds it with ThreadSanitizer (races
between the threads of a block: a missing ``__syncthreads()``) or AddressSanitizer and
UndefinedBehaviorSanitizer (accesses outside the arrays or the block's shared memory); such
a library runs in a process started with :func:`sanitizer_environment`.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
from pathlib import Path

import numpy as np

SHIM_DIR = Path(__file__).resolve().parent
REPO = SHIM_DIR.parents[1]
CUDA_DIR = REPO / "cuda"
GXX_FLAGS = ("-std=c++20", "-pthread", "-O2", "-shared", "-fPIC")
SANITIZERS = {
    "thread": (("-fsanitize=thread", "-g", "-O1"), ("libtsan.so",)),
    "address": (
        ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-g", "-O1"),
        ("libasan.so", "libubsan.so"),
    ),
}
"""g++ flags and runtime libraries (preloaded into Python) of each sanitizer build."""
LAUNCH_ERRORS = {
    -1: "no such kernel",
    -2: "more shared memory than the shim has",
    -3: "the threads of a block reached different numbers of __syncthreads()",
}
"""What a non-zero status of ``shim_launch`` means."""


def build_shim(
    out_dir: Path,
    class_block: int,
    sanitizer: str | None = None,
    cuda_dir: Path = CUDA_DIR,
    load_group: int = 1,
) -> Path:
    """Compile the kernels of ``cuda_dir`` for the CPU with ``CONVCRF_CLASS_BLOCK=class_block``
    and ``CONVCRF_LOAD_GROUP=load_group``, with ``sanitizer`` (a key of :data:`SANITIZERS`)
    or none; returns the .so."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = (f"_g{load_group}" if load_group != 1 else "") + (f"_{sanitizer}" if sanitizer else "")
    library = out_dir / f"convcrf_shim_cb{class_block}{suffix}.so"
    flags = SANITIZERS[sanitizer][0] if sanitizer else ()
    command = [
        "g++",
        *GXX_FLAGS,
        *flags,
        f"-I{cuda_dir}",
        f"-DCONVCRF_CLASS_BLOCK={class_block}",
        f"-DCONVCRF_LOAD_GROUP={load_group}",
        str(SHIM_DIR / "kernels_driver.cpp"),
        "-o",
        str(library),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return library


def sanitizer_runtime(sanitizer: str) -> list[str] | None:
    """Paths of ``sanitizer``'s runtime libraries from g++, or None where one is missing."""
    paths = []
    for name in SANITIZERS[sanitizer][1]:
        found = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True)
        path = found.stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return None
        paths.append(path)
    return paths


def sanitizer_environment(sanitizer: str) -> dict[str, str]:
    """The environment of a Python process that loads a ``sanitizer`` build: its runtime
    preloaded (an instrumented library must not be loaded into an uninstrumented process
    otherwise), exit code 66 on the first report, leaks of the interpreter not reported."""
    runtime = sanitizer_runtime(sanitizer)
    if runtime is None:
        raise RuntimeError(f"g++ has no {sanitizer} sanitizer runtime")
    options = "exitcode=66:halt_on_error=1"
    return {
        **os.environ,
        "LD_PRELOAD": " ".join(runtime),
        "TSAN_OPTIONS": options,
        "ASAN_OPTIONS": f"{options}:detect_leaks=0",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }


class ShimLauncher:
    """``launch(name, grid, block, args, shared_mem)`` on the CPU; arrays are C-contiguous NumPy
    float32 or torch CPU tensors."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.lib.shim_launch.restype = ctypes.c_int
        self.lib.shim_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self.lib.shim_shared_capacity.restype = ctypes.c_size_t
        self.lib.shim_set_reverse_blocks.argtypes = [ctypes.c_int]
        self.class_block = int(self.lib.shim_class_block())
        self.shared_capacity = int(self.lib.shim_shared_capacity())
        self.launches: list[tuple[str, tuple, tuple, int]] = []

    def reverse_blocks(self, reverse: bool) -> None:
        """Run the blocks of each launch from the last to the first (or, False, in order)."""
        self.lib.shim_set_reverse_blocks(int(reverse))

    def __call__(self, name: str, grid, block, args: tuple, shared_mem: int) -> None:
        """Launch kernel ``name``; a RuntimeError where the shim reports a problem, or where two
        array arguments overlap (every pointer parameter of the kernels is ``__restrict__``:
        on a GPU the compiler may then reorder their loads and stores)."""
        arrays = [_as_array(arg) for arg in args]
        _check_no_overlap(name, arrays)
        values = [_ctype_value(arg) for arg in arrays]
        pointers = (ctypes.c_void_p * len(values))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        grid_c = (ctypes.c_uint * 3)(*grid)
        block_c = (ctypes.c_uint * 3)(*block)
        status = self.lib.shim_launch(name.encode(), grid_c, block_c, shared_mem, pointers)
        if status != 0:
            raise RuntimeError(f"shim launch of {name}: {LAUNCH_ERRORS.get(status, status)}")
        self.launches.append((name, tuple(grid), tuple(block), shared_mem))


def _as_array(arg):
    """A torch CPU tensor as the NumPy array sharing its memory; other arguments as they are."""
    return arg.numpy() if type(arg).__module__.startswith("torch") else arg


def _check_no_overlap(name: str, args: list) -> None:
    spans = sorted(
        (arg.ctypes.data, arg.ctypes.data + arg.nbytes, i)
        for i, arg in enumerate(args)
        if isinstance(arg, np.ndarray) and arg.nbytes
    )
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise RuntimeError(
                f"shim launch of {name}: arguments {min(first, second)} and "
                f"{max(first, second)} overlap (the kernels' pointers are __restrict__)"
            )


def _ctype_value(arg):
    """The ctypes object holding one kernel argument, as CuPy would pass it."""
    if isinstance(arg, np.ndarray):
        if arg.dtype != np.float32 or not arg.flags.c_contiguous:
            raise TypeError(f"kernel arrays must be C-contiguous float32, got {arg.dtype}")
        return ctypes.c_void_p(arg.ctypes.data)
    if isinstance(arg, np.int32):
        return ctypes.c_int32(int(arg))
    if isinstance(arg, np.float32):
        return ctypes.c_float(float(arg))
    raise TypeError(f"kernel arguments must be arrays, numpy.int32 or numpy.float32, got {arg!r}")
