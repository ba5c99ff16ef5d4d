"""Build the CPU shim of the CUDA kernels and launch them from Python like CuPy would.

``build_shim(out_dir, class_block)`` compiles ``kernels_driver.cpp`` (which includes the
unmodified ``cuda/*.cu``) with g++ into a shared library; ``ShimLauncher`` is a ``launch``
callable for :func:`convcrf_cli.backends.cuda.run_plan` that runs on NumPy arrays.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np

SHIM_DIR = Path(__file__).resolve().parent
REPO = SHIM_DIR.parents[1]
CUDA_DIR = REPO / "cuda"
GXX_FLAGS = ("-std=c++20", "-pthread", "-O2", "-shared", "-fPIC")


def build_shim(out_dir: Path, class_block: int) -> Path:
    """Compile the kernels for the CPU with ``CONVCRF_CLASS_BLOCK=class_block``; returns the .so."""
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / f"convcrf_shim_cb{class_block}.so"
    command = [
        "g++",
        *GXX_FLAGS,
        f"-I{CUDA_DIR}",
        f"-DCONVCRF_CLASS_BLOCK={class_block}",
        str(SHIM_DIR / "kernels_driver.cpp"),
        "-o",
        str(library),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return library


class ShimLauncher:
    """``launch(name, grid, block, args, shared_mem)`` on the CPU; arrays are NumPy float32."""

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
        self.class_block = int(self.lib.shim_class_block())
        self.shared_capacity = int(self.lib.shim_shared_capacity())
        self.launches: list[tuple[str, tuple, tuple, int]] = []

    def __call__(self, name: str, grid, block, args: tuple, shared_mem: int) -> None:
        values = [_ctype_value(arg) for arg in args]
        pointers = (ctypes.c_void_p * len(values))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        grid_c = (ctypes.c_uint * 3)(*grid)
        block_c = (ctypes.c_uint * 3)(*block)
        status = self.lib.shim_launch(name.encode(), grid_c, block_c, shared_mem, pointers)
        if status != 0:
            raise RuntimeError(f"shim launch of {name} failed with status {status}")
        self.launches.append((name, tuple(grid), tuple(block), shared_mem))


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
