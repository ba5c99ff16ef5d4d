"""Every cuda/*.cu compiles with nvcc for sm_80 and sm_90 (no GPU needed)."""

from __future__ import annotations

import functools
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_kernel_sources_exist():
    assert {p.name for p in SOURCES} == {"features.cu", "message.cu", "fullres.cu", "fused.cu"}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: CUDA compile check skipped")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, arch, tmp_path):
    # Class block and load group larger than the backend's, so register arrays are at least
    # as large as on the GPU (the register test below compiles the backend's own options).
    command = [
        NVCC,
        "-cubin",
        f"-arch={arch}",
        "-DCONVCRF_CLASS_BLOCK=32",
        "-DCONVCRF_LOAD_GROUP=8",
        "-Werror",
        "all-warnings",
        str(source),
        "-o",
        str(tmp_path / f"{source.stem}.cubin"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{source.stem}.cubin").stat().st_size > 0


# -- registers: every kernel launches at the largest block the plans give it ----------------
REGISTERS_PER_BLOCK = 65536
"""Registers a block may hold on sm_80 and sm_90."""


def _block_registers(registers: int, threads: int) -> int:
    """Registers a block of ``threads`` takes at ``registers`` per thread: whole warps, each
    allocated in units of 256 registers."""
    warps = -(-threads // 32)
    return warps * -(-registers * 32 // 256) * 256


@functools.cache
def _largest_blocks() -> dict[str, int]:
    """Most threads per block each kernel gets from the launch plans: inference with every
    message kernel, fused and not, over filter sizes, blurs and class counts, and the module's
    forward and backward pass."""
    from convcrf_cli import fused_meanfield
    from convcrf_cli.backends import DeviceError
    from convcrf_cli.backends.cuda_plan import (
        MAX_SHARED_MEMORY,
        MESSAGE_KERNELS,
        LaunchConfig,
        MeanFieldPlan,
        run_plan,
    )
    from convcrf_cli.params import CRFParams

    largest: dict[str, int] = {}

    def record(name, grid, block, args, shared_mem) -> None:
        largest[name] = max(largest.get(name, 0), block[0] * block[1] * block[2])

    for message_kernel in ("auto", *MESSAGE_KERNELS):
        for fuse in (False, True):
            config = LaunchConfig(
                message_kernel=message_kernel, fuse_message=fuse, shared_memory=MAX_SHARED_MEMORY
            )
            for k, blur, classes in itertools.product(
                (3, 7, 13, 15, 17, 31), (1, 2, 4, 8), (2, 21, 150)
            ):
                params = CRFParams(filter_size=k, blur=blur, iterations=2)
                try:
                    plan = MeanFieldPlan.create(
                        (1, 3, 40, 48), (1, classes, 40, 48), params, config
                    )
                except DeviceError:  # too large for shared memory: the CPU takes it
                    continue
                run_plan(plan, None, None, None, record, lambda shape, dtype: None)

    torch = pytest.importorskip("torch")
    params = CRFParams(filter_size=5, blur=2, iterations=2)
    logits = torch.zeros(1, 3, 8, 8)
    kernel = torch.zeros(1, 5, 5, 4, 4)
    scores, kept = fused_meanfield.mean_field(logits, kernel, params, 1.0, None, record, 3)
    fused_meanfield.mean_field_backward(kept, logits, scores, kernel, 1.0, None, True, record)
    return largest


def _registers(arch: str, module: tuple[int, int], tmp_path: Path) -> dict[str, int]:
    """Registers per thread of every kernel of the module as the backend compiles it (the
    concatenated sources, ``module`` = (class block, load group)), from ptxas's resource
    usage."""
    from convcrf_cli.backends.cuda import compile_options, kernel_source

    source = tmp_path / "convcrf.cu"
    source.write_text(kernel_source())
    command = [NVCC, "-cubin", f"-arch={arch}", *compile_options(*module), "--resource-usage"]
    command += [str(source), "-o", str(tmp_path / "convcrf.cubin")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pattern = r"Compiling entry function '(\w+)'.*?Used (\d+) registers"
    return {name: int(n) for name, n in re.findall(pattern, result.stdout + result.stderr, re.S)}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: register check skipped")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("module", [(1, 1), (11, 1), (16, 1), (11, 8), (16, 8)], ids=str)
def test_every_kernel_fits_the_registers_of_its_largest_block(arch, module, tmp_path):
    # A block needing more registers than the multiprocessor has fails to launch ("too many
    # resources requested") only on a GPU; this catches it from the compiler's numbers.
    from convcrf_cli.backends.cuda import KERNEL_NAMES

    registers = _registers(arch, module, tmp_path)
    largest = _largest_blocks()
    assert set(registers) == set(KERNEL_NAMES) == set(largest)
    too_many = {
        name: (registers[name], threads)
        for name, threads in largest.items()
        if _block_registers(registers[name], threads) > REGISTERS_PER_BLOCK
    }
    assert not too_many, f"(registers per thread, threads per block) over {REGISTERS_PER_BLOCK}"
