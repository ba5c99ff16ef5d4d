"""``convcrf info``: versions, CUDA devices and whether the CUDA kernels compile."""

from __future__ import annotations

import platform
from types import ModuleType

import click

from convcrf_cli import __version__
from convcrf_cli.backends.cuda_tune import TuningCache
from convcrf_cli.commands.common import echo_out, reports_errors


def _cupy_lines() -> list[str]:
    """CuPy version, devices, NVRTC and kernel status as ``name: value`` lines."""
    from convcrf_cli.backends import cuda

    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that does not load
        reason = cuda.cuda_unavailable_reason(0) or str(exc)
        return [f"cupy: not usable ({reason})"]
    lines = [f"cupy: {cupy.__version__}", f"nvrtc: {cuda.nvrtc_version()}"]
    problem = cuda.nvrtc_check("compute_80")
    lines.append("kernels compile (NVRTC, compute_80): " + ("yes" if problem is None else "no"))
    if problem is not None:
        lines.append(f"  {problem.splitlines()[0]}")
    lines += _device_lines(cupy, cuda)
    lines.append(_cache_line(TuningCache()))
    return lines


def _cache_line(cache: TuningCache) -> str:
    """How many launch plans ``cache`` holds, where, and what is wrong with its file."""
    try:
        cache.path.stat()
    except FileNotFoundError:
        return f"tuned launch plans: none yet (kept in {cache.path} once timed)"
    except OSError:
        pass  # the file's problem() says what
    problem = cache.problem()
    fault = f"; the file {problem}" if problem else ""
    return f"tuned launch plans: {len(cache)} in {cache.path}{fault} (delete it to time them again)"


def _device_lines(cupy: ModuleType, cuda: ModuleType) -> list[str]:
    """The CUDA device count and one line per device (name, compute capability, memory)."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return [f"cuda devices: none ({type(exc).__name__}: {str(exc).splitlines()[0]})"]
    lines = [f"cuda devices: {count}"]
    for index in range(count):
        props = cuda.device_properties(index)
        name = props["name"]
        reason = cuda.cuda_unavailable_reason(index)
        status = "kernels load" if reason is None else f"unusable: {reason}"
        lines.append(
            f"  cuda:{index}: {name}, compute {props['major']}.{props['minor']}, "
            f"{props['totalGlobalMem'] / 2**30:.1f} GiB ({status})"
        )
    return lines


@click.command("info")
@reports_errors
def info_command() -> None:
    """Print versions, CUDA devices and whether the CUDA kernels compile."""
    import torch

    from convcrf_cli.backends import select_backend

    lines = [
        f"convcrf: {__version__}",
        f"python: {platform.python_version()} ({platform.machine()})",
        f"torch: {torch.__version__} ({torch.get_num_threads()} threads)",
        *_cupy_lines(),
    ]
    backend = select_backend("auto")
    lines.append(f"--device auto uses: {backend.describe()}")
    fallback = getattr(backend, "fallback_reason", None)
    if fallback:
        lines.append(f"  because: {fallback}")
    echo_out("\n".join(lines), "the report")
