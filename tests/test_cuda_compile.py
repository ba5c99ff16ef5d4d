"""Every cuda/*.cu compiles with nvcc for sm_80 and sm_90 (no GPU needed)."""

from __future__ import annotations

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
    # The largest class block the backend uses, so register arrays are sized as on the GPU.
    command = [
        NVCC,
        "-cubin",
        f"-arch={arch}",
        "-DCONVCRF_CLASS_BLOCK=32",
        "-Werror",
        "all-warnings",
        str(source),
        "-o",
        str(tmp_path / f"{source.stem}.cubin"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{source.stem}.cubin").stat().st_size > 0
