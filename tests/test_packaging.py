"""The built wheel (not the editable install) carries the kernel sources and finds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("features.cu", "message.cu", "fullres.cu", "fused.cu")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("convcrf_cli-*.whl")
    return path


def test_wheel_holds_the_kernels_inside_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"convcrf_cli/cuda/{name}" for name in KERNELS} <= names
    # no top-level `cuda` package, which would hide NVIDIA's `cuda` namespace (CuPy needs it)
    assert not any(name.startswith("cuda/") for name in names)
    assert any(name.endswith("entry_points.txt") for name in names)


def test_installed_wheel_reads_its_own_kernel_sources(wheel, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    probe = (
        "import json, convcrf_cli; from convcrf_cli.backends import cuda; "
        "print(json.dumps([convcrf_cli.__file__, cuda.kernel_source(), cuda.nvrtc_check()]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    module_file, source, compile_problem = json.loads(result.stdout)
    assert Path(module_file).is_relative_to(site)
    assert source == "\n".join((REPO / "cuda" / name).read_text() for name in KERNELS)
    if compile_problem is not None and "does not load" not in compile_problem:
        pytest.fail(f"the installed kernels do not compile: {compile_problem}")
