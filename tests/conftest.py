"""Shared test configuration: make ``tests/`` importable (for ``reference``) and keep the
repository root off ``sys.path`` (on Python 3.10, which ignores ``PYTHONSAFEPATH``), skip GPU tests
where CuPy or a CUDA device is missing, keep the CUDA tuning cache of each test in its own
temporary directory, and build the CPU shim of the CUDA kernels once.

With ``CONVCRF_GPU_TESTS_ON_SHIM=1`` (``make test-gpu-shim``) the NumPy stand-in for CuPy
(``cuda_shim/fake_cupy.py``) is CuPy for the whole session, so the GPU tests that need CuPy
but not torch on CUDA run on the C++ shim: their own code is checked before a device runs it.
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
if not hasattr(sys.flags, "safe_path"):
    # Python 3.10 has no PYTHONSAFEPATH: `python -m pytest` from the repository root puts the
    # root on sys.path, where its cuda/ kernel folder would hide NVIDIA's `cuda` package that
    # CuPy imports. Leave it off, as PYTHONSAFEPATH=1 does on 3.11 and later.
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]
sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("CONVCRF_GPU_TESTS_ON_SHIM") == "1":
    from cuda_shim import fake_cupy

    sys.modules["cupy"] = fake_cupy

SHIM_BUILD_DIR = Path(__file__).parent / "_build"
SHIM_CLASS_BLOCK = 4
"""Classes per chunk in the shim build: 21 classes take 6 chunks, the last partial."""


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def private_tuning_cache(tmp_path_factory, monkeypatch):
    """``CONVCRF_CACHE_DIR`` in a fresh directory: no test reads or writes the user's cache."""
    monkeypatch.setenv("CONVCRF_CACHE_DIR", str(tmp_path_factory.mktemp("convcrf_cache")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For tests on tiny tensors, where torch's thread pool only adds synchronisation."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_runner(**options) -> CliRunner:
    """A ``CliRunner`` whose results keep stderr apart from stdout, as click 8.2 on always
    does; click 8.1 mixes them into ``stdout`` unless given ``mix_stderr=False`` (an argument
    8.2 removed). ``output`` is stdout and stderr together on 8.2 but stdout alone on 8.1."""
    if "mix_stderr" in inspect.signature(CliRunner).parameters:
        options["mix_stderr"] = False
    return CliRunner(**options)


def require_gxx() -> None:
    """Skip the test where g++ is missing: the CPU shim of the CUDA kernels cannot be built."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: cannot build the CPU shim of the CUDA kernels")


def shim_launcher(class_block: int, load_group: int = 1):
    """The ``cuda/*.cu`` kernels built for the CPU (``tests/cuda_shim``) with ``class_block``
    classes per chunk and loads in groups of ``load_group``, as a ``launch``; skips
    the test where g++ is missing."""
    from cuda_shim.launcher import ShimLauncher, build_shim

    require_gxx()
    return ShimLauncher(build_shim(SHIM_BUILD_DIR, class_block, load_group=load_group))


@pytest.fixture
def fake_cupy():
    """``cuda_shim/fake_cupy.py`` installed as ``cupy`` for the test
    (:func:`fake_cupy.installed`); skips the test where g++ is missing."""
    require_gxx()
    from cuda_shim import fake_cupy

    with fake_cupy.installed() as module:
        yield module


@pytest.fixture(scope="session")
def shim():
    """:func:`shim_launcher` at :data:`SHIM_CLASS_BLOCK`."""
    return shim_launcher(SHIM_CLASS_BLOCK)
