"""The CUDA backend's Python logic without a device: kernel sources as package data, compile
options, block and chunk choices, launch geometry, input kinds, NVRTC, and the CPU fallback."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cuda_shim.fake_cupy import NVRTC_LOG

from convcrf_cli.backends import DeviceError, cuda, cuda_plan, select_backend
from convcrf_cli.params import CRFParams


def test_kernel_source_defines_every_kernel():
    source = cuda.kernel_source()
    pattern = r'extern "C" __global__ void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\('
    defined = re.findall(pattern, source)
    assert sorted(defined) == sorted(cuda.KERNEL_NAMES)


def test_compile_options_set_the_class_block_and_load_group():
    assert cuda.compile_options(11) == (
        "-std=c++17",
        "-DCONVCRF_CLASS_BLOCK=11",
        "-DCONVCRF_LOAD_GROUP=1",
    )
    assert cuda.compile_options(16, 8)[1:] == (
        "-DCONVCRF_CLASS_BLOCK=16",
        "-DCONVCRF_LOAD_GROUP=8",
    )


def test_class_block_fills_shared_memory_and_balances_chunks():
    # k=7, 16x16 cells: tile 22x22 = 1936 bytes per channel; 3 colours + 2 positions.
    small = cuda_plan.LaunchConfig(shared_memory=48 * 1024)  # 25 channels fit -> 20 classes
    assert cuda_plan.class_block_for(21, 3, 7, small) == 11  # 21 classes in 2 chunks of 11 and 10
    large = cuda_plan.LaunchConfig(shared_memory=64 * 1024)  # 33 channels -> 28 classes
    assert cuda_plan.class_block_for(21, 3, 7, large) == 11  # capped at 16 per chunk
    assert cuda_plan.class_block_for(2, 3, 7, small) == 2
    assert cuda_plan.class_block_for(16, 3, 7, large) == 16
    assert cuda_plan.class_block_for(256, 3, 3, large) == 16
    assert cuda_plan.class_block_for(100, 3, 3, large) == 15  # 7 chunks of 15 (the last 10)


def test_filter_too_large_for_shared_memory_is_a_device_error():
    with pytest.raises(DeviceError, match="filter size 41"):
        cuda_plan.class_block_for(21, 3, 41, cuda_plan.LaunchConfig())


def test_blur_too_large_is_a_device_error():
    params = CRFParams(blur=80)
    with pytest.raises(DeviceError, match="blur 80"):
        cuda_plan.MeanFieldPlan.create(
            (1, 3, 200, 200), (1, 2, 200, 200), params, cuda_plan.LaunchConfig()
        )


H100 = cuda_plan.LaunchConfig(shared_memory=64 * 1024, tiled_min_blocks=2 * 132)
"""What the backend chooses on an H100 (132 multiprocessors, 227 KiB of opt-in shared memory)."""


def test_plan_geometry_at_pascal_size():
    """500x375 (H=375, W=500), blur 4: coarse 94x125, padding 0/1/0, hand-computed grids."""
    params = CRFParams(filter_size=7, blur=4)
    plan = cuda_plan.MeanFieldPlan.create((2, 3, 375, 500), (2, 21, 375, 500), params, H100)
    assert (plan.coarse_h, plan.coarse_w) == (94, 125)
    assert (plan.pad_y, plan.pad_x) == (1, 0)  # 376 - 375 = 1 -> ceil(1/2) = 1
    assert plan.cell_grid == (8, 6, 2)
    assert plan.class_block == 11 and plan.num_chunks == 2
    assert plan.message_grid == (8, 6, 4)
    # 4 x 12 blocks of 32x8 cells per image would be too few for the tiled kernel (264)
    assert plan.message_kernel == "per-cell"
    assert plan.message_launch(None, None, None)[:3] == ("convcrf_message", (8, 6, 4), (16, 16, 1))
    assert plan.message_shared == 4 * (2 + 3 + 11) * 22 * 22
    assert plan.pool_tile == (2, 8)  # an 8x32-pixel box
    assert plan.pool_grid == (16, 47, 2)
    assert plan.chunk_classes == 21  # all: 48 KiB / 1 KiB per class - 2 statistics = 46
    assert plan.pool_shared == 4 * 23 * 256
    assert plan.pixel_grid == (16, 47, 2)


def test_plan_at_blur_one_tiles_pixels_and_keeps_scores_in_shared_memory():
    params = CRFParams(filter_size=7, blur=1)
    plan = cuda_plan.MeanFieldPlan.create((1, 3, 2048, 2048), (1, 21, 2048, 2048), params, H100)
    assert (plan.coarse_h, plan.coarse_w, plan.pad_y, plan.pad_x) == (2048, 2048, 0, 0)
    assert plan.pool_tile == (8, 32)
    assert plan.pool_grid == (64, 256, 1)
    assert plan.chunk_classes == 21  # each pixel's 21 scores kept in shared memory
    assert plan.pool_shared == 4 * 21 * 256
    many = cuda_plan.MeanFieldPlan.create((1, 3, 64, 64), (1, 100, 64, 64), params, H100)
    assert (many.chunk_classes, many.pool_shared) == (0, 0)  # 100 KiB do not fit: recomputed


def test_large_grids_take_the_tiled_message_kernel():
    """2048x2048 at blur 1: 64x256 blocks of 8x8 threads, each thread 4 cells of a row; a
    quarter row of 8 + (3 + 6) // 4 = 10 words, 14 rows of 40 words per channel."""
    params = CRFParams(filter_size=7, blur=1)
    plan = cuda_plan.MeanFieldPlan.create((1, 3, 2048, 2048), (1, 21, 2048, 2048), params, H100)
    assert plan.message_kernel == "tiled"
    assert plan.class_block == 11  # 65536 // (4 * 560) - 5 = 24 fit, capped at 16, balanced
    name, grid, block, args, shared = plan.message_launch("feat", "pooled", "message")
    assert (name, grid, block) == ("convcrf_message_tiled", (64, 256, 2), (8, 8, 1))
    assert shared == plan.message_shared == 4 * (5 + 11) * 40 * 14
    assert args[:3] == ("feat", "pooled", "message") and int(args[-1]) == 10


def test_tiled_message_needs_room_for_its_features():
    """More than 4 image channels do not fit the tiled kernel's registers; the per-cell kernel
    takes them."""
    params = CRFParams(filter_size=7, blur=1)
    plan = cuda_plan.MeanFieldPlan.create((1, 5, 512, 512), (1, 21, 512, 512), params, H100)
    assert plan.message_kernel == "per-cell"
    assert cuda_plan.message_kernel_for(1, 4, 512, 512, 7, H100) == "tiled"
    assert cuda_plan.message_kernel_for(1, 5, 512, 512, 7, H100) == "per-cell"
    assert (
        cuda_plan.message_kernel_for(1, 3, 100, 100, 7, H100) == "per-cell"
    )  # 4 x 13 blocks < 264
    assert cuda_plan.message_kernel_for(1, 3, 100, 100, 7, cuda_plan.LaunchConfig()) == "tiled"


def test_split_message_plan():
    """500x375 at blur 4 with the split kernel: 8x8 cells per block, 7 threads per cell (one
    window row each), their partial sums beside the tile in shared memory."""
    config = dataclasses.replace(H100, message_kernel="split")
    params = CRFParams(filter_size=7, blur=4)
    plan = cuda_plan.MeanFieldPlan.create((1, 3, 375, 500), (1, 21, 375, 500), params, config)
    assert plan.message_kernel == "split" and plan.class_block == 11
    name, grid, block, _, shared = plan.message_launch(None, None, None)
    assert (name, grid, block) == ("convcrf_message_split", (16, 12, 2), (8, 8, 7))
    assert shared == 4 * ((5 + 11) * 14 * 14 + 11 * 7 * 64)
    one_cell = dataclasses.replace(H100, split_cells=(1, 1))
    assert cuda_plan.split_rows(99, one_cell) == 64  # CUDA blocks hold at most 64 threads in z
    assert cuda_plan.split_rows(17, config) == 16  # 1024 threads per block
    with pytest.raises(ValueError, match="message_kernel"):
        cuda_plan.message_kernel_for(
            1, 3, 94, 125, 7, dataclasses.replace(H100, message_kernel="fast")
        )


@pytest.mark.parametrize("threads_x", [4, 8, 16, 32])
@pytest.mark.parametrize("filter_size", [3, 5, 7, 9, 11, 13, 15])
def test_tiled_message_rows_of_a_warp_use_distinct_banks(threads_x, filter_size):
    """Every shared-memory load of the tiled kernel's inner loop (neighbour j of a window row)
    by the 32 threads of a warp hits 32 different banks, and stays inside its quarter row."""
    quarter = cuda_plan.row_quarter(threads_x, filter_size)
    span = cuda_plan.TILE_CELLS - 1 + 2 * (filter_size // 2)
    assert threads_x - 1 + span // 4 < quarter
    warp = [(t % threads_x, t // threads_x) for t in range(32)]
    for j in range(span + 1):
        words = [ty * 4 * quarter + (j % 4) * quarter + tx + j // 4 for tx, ty in warp]
        assert len({word % 32 for word in words}) == 32, (j, words)


def test_tiled_message_rejects_other_thread_counts():
    with pytest.raises(ValueError, match="4, 8, 16 or 32"):
        cuda_plan.row_quarter(12, 7)


def test_large_batches_take_several_launches_within_cuda_grid_limits():
    # 150 classes in 10 chunks of 15: the message grid stacks 10 chunks per image along z
    assert cuda_plan.launch_slices(5, 150, 7) == [slice(0, 5)]
    assert cuda_plan.launch_slices(1000, 150, 7) == [
        slice(0, 436),
        slice(436, 872),
        slice(872, 1000),
    ]
    assert cuda_plan.launch_slices(4000, 2, 31) == [slice(0, 2114), slice(2114, 4000)]
    config, params = cuda_plan.LaunchConfig(), CRFParams(filter_size=7, blur=2)
    for part in cuda_plan.launch_slices(1000, 150, 7):
        images = part.stop - part.start
        plan = cuda_plan.MeanFieldPlan.create(
            (images, 3, 8, 8), (images, 150, 8, 8), params, config
        )
        assert plan.message_grid[2] == 10 * images <= cuda_plan.MAX_GRID_YZ
    with pytest.raises(DeviceError, match="smaller batches"):
        cuda_plan.MeanFieldPlan.create((437, 3, 8, 8), (437, 150, 8, 8), params, config)


def test_plan_rejects_images_taller_than_the_grids():
    params, config = CRFParams(filter_size=3, blur=1), cuda_plan.LaunchConfig()
    tallest = cuda_plan.MAX_GRID_YZ * config.pixel_block[1]
    cuda_plan.MeanFieldPlan.create((1, 3, tallest, 1), (1, 2, tallest, 1), params, config)
    with pytest.raises(DeviceError, match="pixels high"):
        cuda_plan.MeanFieldPlan.create(
            (1, 3, tallest + 1, 1), (1, 2, tallest + 1, 1), params, config
        )


def test_plan_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        cuda_plan.MeanFieldPlan.create(
            (1, 3, 8, 8), (1, 2, 8, 9), CRFParams(), cuda_plan.LaunchConfig()
        )


def test_array_kinds():
    assert cuda.array_kind(np.zeros(2)) == "numpy"
    assert cuda.array_kind(torch.zeros(2)) == "torch-cpu"


def test_the_kernel_folder_does_not_hide_nvidias_cuda_package():
    """``import cuda`` in the test session never finds the repository's ``cuda/`` kernel folder
    (CuPy imports ``cuda.pathfinder`` from NVIDIA's package): tests/conftest.py keeps the root
    off ``sys.path`` on Python 3.10, where ``PYTHONSAFEPATH=1`` has no effect."""
    spec = importlib.util.find_spec("cuda")
    locations = [] if spec is None else list(spec.submodule_search_locations or [])
    kernel_folder = Path(__file__).resolve().parents[1] / "cuda"
    assert kernel_folder not in [Path(location).resolve() for location in locations]


@pytest.mark.parametrize("safe_path_flag", [True, False])
def test_import_problem_names_a_remedy_this_python_has(monkeypatch, safe_path_flag):
    """Where the repository's ``cuda/`` was imported as NVIDIA's ``cuda``, the message offers
    PYTHONSAFEPATH=1 only on a Python that has it (3.11 on; 3.10 ignores the variable)."""
    kernel_folder = Path(__file__).resolve().parents[1] / "cuda"
    monkeypatch.setitem(
        sys.modules, "cuda", SimpleNamespace(__file__=str(kernel_folder / "__init__.py"))
    )
    flags = SimpleNamespace(safe_path=False) if safe_path_flag else SimpleNamespace()
    monkeypatch.setattr(sys, "flags", flags)
    text = cuda._import_problem(ImportError("cannot import name 'pathfinder' from 'cuda'"))
    assert text.startswith("ImportError: cannot import name 'pathfinder'")
    assert f"the kernel directory {kernel_folder} hides NVIDIA's 'cuda' package" in text
    if safe_path_flag:
        assert text.endswith("; run from another directory or set PYTHONSAFEPATH=1)")
    else:
        assert text.endswith(
            "; run from another directory (PYTHONSAFEPATH=1 needs Python 3.11 or newer))"
        )


def test_external_stream_wraps_the_handle_without_deprecated_api():
    """CuPy 14 deprecates ExternalStream (a DeprecationWarning on every launch on torch's
    stream); the stream from the CUDA stream protocol carries the same handle. Creating a
    stream object needs no device."""
    cupy = pytest.importorskip("cupy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = cuda.external_stream(cupy, 0x5EED, 0)
    assert stream.ptr == 0x5EED


def test_external_stream_before_cupy_14_takes_external_stream():
    made = []

    class OldStream:  # CuPy 13: no from_external
        pass

    def external(handle, device):
        made.append((handle, device))
        return "stream"

    old_cupy = SimpleNamespace(cuda=SimpleNamespace(Stream=OldStream, ExternalStream=external))
    assert cuda.external_stream(old_cupy, 7, 1) == "stream"
    assert made == [(7, 1)]


def test_cupy_that_cannot_make_its_cache_directory_is_unusable_with_the_reason(monkeypatch):
    # `import cupy` makes ~/.cupy: under an unwritable HOME its PermissionError was a traceback
    # of every command on --device auto (the default).
    def import_cupy():
        raise PermissionError(13, "Permission denied", "/home/u/.cupy")

    monkeypatch.setattr(cuda, "import_cupy", import_cupy)
    assert cuda.cuda_unavailable_reason.__wrapped__(0) == (
        "CuPy does not import: PermissionError: [Errno 13] Permission denied: '/home/u/.cupy' "
        "(set CUPY_CACHE_DIR to a writable directory)"
    )


def _gpu_usable() -> bool:
    return cuda.cuda_unavailable_reason(0) is None


@pytest.mark.skipif(_gpu_usable(), reason="a CUDA device is usable here: fallback not exercised")
def test_auto_falls_back_to_cpu_with_the_reason():
    reason = cuda.cuda_unavailable_reason(0)
    assert reason and "\n" not in reason
    backend = select_backend("auto")
    assert backend.name == "cpu"
    assert backend.fallback_reason == reason
    with pytest.raises(DeviceError, match=re.escape(reason)):
        select_backend("cuda")


@pytest.mark.parametrize(
    "message, line",
    [
        (NVRTC_LOG, "line 840: error: too many resources requested for launch"),  # not the warning
        ("nvrtc: error: invalid value for --gpu-architecture (-arch)\n", None),
        ("CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with ...", None),
        ("\n  warning only\n", "warning only"),
        ("", "RuntimeError"),
    ],
)
def test_first_error_line_says_what_failed(message, line):
    assert cuda.first_error_line(RuntimeError(message)) == (line or message.strip())


def _nvrtc_problem() -> str | None:
    return cuda._load_nvrtc()[1]


@pytest.mark.skipif(_nvrtc_problem() is not None, reason=str(_nvrtc_problem()))
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("class_block", [1, 21, 32])
def test_nvrtc_compiles_the_module(arch, class_block):
    """The exact source and options the backend hands to cupy.RawModule compile with NVRTC."""
    assert cuda.nvrtc_check(arch, class_block) is None


def test_info_command_reports_versions_and_the_auto_device():
    from conftest import cli_runner

    from convcrf_cli.cli import main

    result = cli_runner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert f"torch: {torch.__version__}" in result.output
    expected = select_backend("auto").describe()
    assert f"--device auto uses: {expected}" in result.output
    if "cupy: not usable" not in result.output:  # CuPy imports: the tuning cache is shown
        cache = Path(os.environ["CONVCRF_CACHE_DIR"]) / "cuda_tuning.json"
        assert f"tuned launch plans: none yet (kept in {cache} once timed)" in result.output


class _FakeKernel:
    """Stands in for a cupy.RawKernel: counts attribute reads, writes and launches."""

    def __init__(self) -> None:
        self.limit = 48 * 1024
        self.reads = self.writes = 0
        self.launches: list[tuple] = []

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        self.reads += 1
        return self.limit

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        self.writes += 1
        self.limit = value

    def __call__(self, grid, block, args, shared_mem=0) -> None:
        assert shared_mem <= self.limit, "launched with more shared memory than opted in"
        self.launches.append((grid, block, args, shared_mem))


class _FakeModule:
    def __init__(self) -> None:
        self.kernels: dict[str, _FakeKernel] = {}
        self.lookups = 0

    def get_function(self, name: str) -> _FakeKernel:
        self.lookups += 1
        return self.kernels.setdefault(name, _FakeKernel())


def test_launcher_looks_kernels_up_and_opts_in_to_shared_memory_once():
    module = _FakeModule()
    launch = cuda._CuPyLauncher(module)
    for _ in range(3):
        launch("convcrf_message_tiled", (2, 3, 4), (8, 8, 1), (np.int32(1),), 60 * 1024)
        launch("convcrf_step", (1, 1, 1), (256, 1, 1), (), 20 * 1024)
    tiled, step = module.kernels["convcrf_message_tiled"], module.kernels["convcrf_step"]
    assert module.lookups == 2
    assert (tiled.reads, tiled.writes, tiled.limit) == (1, 1, 60 * 1024)
    assert (step.reads, step.writes) == (0, 0)  # within the default 48 KiB
    assert len(tiled.launches) == len(step.launches) == 3
    launch("convcrf_message_tiled", (1, 1, 1), (8, 8, 1), (), 62 * 1024)  # more: opt in again
    assert (tiled.writes, tiled.limit) == (2, 62 * 1024)


def test_backend_plans_once_per_shape_and_parameters():
    params = CRFParams(filter_size=7, blur=4)
    config = cuda_plan.LaunchConfig()
    first = cuda._cached_plan((1, 3, 375, 500), (1, 21, 375, 500), params, config)
    assert cuda._cached_plan((1, 3, 375, 500), (1, 21, 375, 500), params, config) is first
    other = cuda._cached_plan((1, 3, 375, 500), (1, 21, 375, 500), CRFParams(blur=2), config)
    assert other is not first and other.blur == 2
