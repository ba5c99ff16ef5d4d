"""The CUDA backend's own Python code run end to end without a GPU: ``tests/cuda_shim/
fake_cupy.py`` stands in for CuPy (NumPy arrays as device arrays, the C++ shim as the device),
so ``CUDABackend.run``, ``refine(device="cuda")``, ``convcrf info`` and ``bench/bench_gpu.py``
run unchanged on the real kernels and are checked against the float64 reference."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import require_gxx
from test_cuda_shim import assert_matches_reference, random_inputs

from convcrf_cli import refine
from convcrf_cli.backends import cuda_plan, select_backend
from convcrf_cli.params import CRFParams

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def fake_cupy():
    require_gxx()
    from cuda_shim import fake_cupy

    with fake_cupy.installed() as module:
        yield module


def test_backend_run_matches_reference(fake_cupy):
    params = CRFParams(filter_size=5, blur=2, iterations=3)
    image, logits = random_inputs(1, 2, 13, 17, 5, 3)
    backend = select_backend("cuda")
    assert backend.name == "cuda" and "C++ shim" in backend.describe()
    scores = backend.run(np.ascontiguousarray(image.transpose(0, 3, 1, 2)), logits, params)
    assert type(scores) is np.ndarray and scores.dtype == np.float32
    assert_matches_reference(scores, image, logits, params)


def test_backend_returns_the_kind_of_array_it_was_given(fake_cupy):
    params = CRFParams(filter_size=3, blur=2, iterations=2)
    image, logits = random_inputs(2, 1, 9, 11, 3, 3)
    image_nfhw = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
    backend = select_backend("cuda")
    on_device = backend.run(fake_cupy.asarray(image_nfhw), fake_cupy.asarray(logits), params)
    assert type(on_device) is fake_cupy.ndarray
    on_torch = backend.run(torch.from_numpy(image_nfhw), torch.from_numpy(logits), params)
    assert isinstance(on_torch, torch.Tensor)
    np.testing.assert_array_equal(on_torch.numpy(), on_device.get())


def test_batch_beyond_one_grid_takes_several_launches(fake_cupy, monkeypatch):
    # a grid of 12 blocks along z: 2 images of 5 classes per launch, so 3 launches for 5
    monkeypatch.setattr(cuda_plan, "MAX_GRID_YZ", 12)
    params = CRFParams(filter_size=3, blur=2, iterations=2)
    image, logits = random_inputs(3, 5, 10, 12, 5, 3)
    backend = select_backend("cuda")
    scores = backend.run(np.ascontiguousarray(image.transpose(0, 3, 1, 2)), logits, params)
    assert fake_cupy.launches.count("convcrf_init") == 3
    assert_matches_reference(scores, image, logits, params)


def test_refine_on_cuda_equals_refine_on_cpu(fake_cupy):
    params = CRFParams(filter_size=5, blur=3, iterations=4)
    image, logits = random_inputs(4, 1, 20, 23, 4, 3)
    on_cuda = refine(image[0], logits[0], params, device="cuda")
    on_cpu = refine(image[0], logits[0], params, device="cpu")
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


def test_info_reports_the_device_and_auto_takes_it(fake_cupy):
    from convcrf_cli.cli import main

    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "cuda devices: 1" in result.output
    assert "cuda:0: C++ shim of the CUDA kernels" in result.output
    assert "(kernels load)" in result.output
    assert "--device auto uses: cuda:0 (C++ shim of the CUDA kernels" in result.output


def test_gpu_benchmark_script_runs_and_prints_its_tables(fake_cupy, monkeypatch, capsys):
    """bench/bench_gpu.py as on a GPU, on two small cases, each timing one run (the shim's
    times mean nothing): after each case's row of the main table, its rows of the inference
    variants and of the message kernels, each equal to the default's numbers to 1e-4."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_gpu", None)
    bench_gpu = importlib.import_module("bench_gpu")
    try:
        cases = [
            ("40x30 C=5 blur 2 k=5", 30, 40, 5, 2, 5),
            ("40x30 C=3 blur 1 k=3", 30, 40, 3, 1, 3),
        ]
        monkeypatch.setattr(bench_gpu, "CASES", cases)
        monkeypatch.setattr(bench_gpu, "copy_bandwidth", lambda: 1e12)
        monkeypatch.setattr(bench_gpu, "time_gpu_ms", lambda fn, *args: _once_ms(fn))
        monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--repeats", "1", "--no-baseline"])
        bench_gpu.main()
    finally:
        sys.modules.pop("bench_gpu", None)
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()]
    names = {label: [] for label, *_ in cases}
    for row in rows:
        label = row[0].lstrip("| ")
        if label in names:
            names[label].append(row[1])
        if label in names and len(row) == 5:  # comparison rows: time, ratio, largest difference
            assert float(row[4].rstrip(" |")) <= 1e-4, row
    assert names["40x30 C=5 blur 2 k=5"][1:] == [
        *("default", "split message", "tiled message", "fused iterations"),
        *("per-cell", "split", "tiled"),
    ]
    assert names["40x30 C=3 blur 1 k=3"][1:] == [
        *("default", "split message", "tiled message"),  # no fused iterations at blur 1
        *("per-cell", "split", "tiled"),
    ]


def _once_ms(fn) -> float:
    fn()
    return 1.0
