"""The CUDA backend on a GPU against the float64 reference (skipped without CuPy and a device).

Every case of tests/test_cuda_shim.py runs on the device with all buffers poisoned with NaN; a
2048x2048 image is checked against the PyTorch mean field in float64 (itself checked against
tests/reference.py in test_meanfield.py), since the loop-based reference is too slow there.
The differentiable module on CUDA tensors is compared with itself on the CPU, gradients included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cuda_shim import CASES, assert_matches_reference, random_inputs

from convcrf_cli import meanfield
from convcrf_cli.backends import cuda
from convcrf_cli.params import CRFParams

pytestmark = pytest.mark.gpu


def refine_on_gpu(image, logits, params):
    """image [N,H,W,F], logits [N,C,H,W] (NumPy) -> scores [N,C,H,W] (NumPy), every buffer
    NaN-poisoned before the kernels run."""
    import cupy

    backend = cuda.CUDABackend(0)
    image_d = cupy.ascontiguousarray(cupy.asarray(image.transpose(0, 3, 1, 2)), dtype=cupy.float32)
    logits_d = cupy.asarray(logits, dtype=cupy.float32)
    plan = cuda.MeanFieldPlan.create(image_d.shape, logits_d.shape, params, backend.launch_config())
    module = cuda._compiled_module(0, plan.class_block)
    scores = cupy.full(logits_d.shape, cupy.nan, dtype=cupy.float32)

    def poisoned(shape, dtype):
        return cupy.full(shape, cupy.nan, dtype=dtype)

    cuda.run_plan(plan, image_d, logits_d, scores, cuda._CuPyLauncher(module), poisoned)
    return scores.get()


@pytest.mark.parametrize(
    ("height", "width", "classes", "features", "k", "blur", "init", "n", "its"), CASES
)
def test_gpu_matches_reference(height, width, classes, features, k, blur, init, n, its):
    params = CRFParams(filter_size=k, blur=blur, init=init, iterations=its)
    image, logits = random_inputs(height * width + k, n, height, width, classes, features)
    assert_matches_reference(refine_on_gpu(image, logits, params), image, logits, params)


@pytest.mark.parametrize("k", [5, 7, 11, 13, 15])
def test_gpu_pascal_size_batch(k):
    """75x100 (a fifth of Pascal size, padded pooling), C=21, blur 4, a batch of 2, both inits."""
    for init in ("log", "softmax"):
        params = CRFParams(filter_size=k, blur=4, init=init, iterations=5)
        image, logits = random_inputs(k, 2, 75, 100, 21, 3)
        assert_matches_reference(refine_on_gpu(image, logits, params), image, logits, params)


def test_gpu_many_classes():
    params = CRFParams(filter_size=5, blur=2)
    image, logits = random_inputs(7, 1, 40, 33, 150, 3)
    assert_matches_reference(refine_on_gpu(image, logits, params), image, logits, params)


def test_gpu_2048_square_blur_one():
    params = CRFParams(filter_size=7, blur=1, iterations=5)
    image, logits = random_inputs(11, 1, 2048, 2048, 21, 3)
    scores = refine_on_gpu(image, logits, params)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    image_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).double().to(device)
    logits_t = torch.from_numpy(logits).double().to(device)
    with torch.no_grad():
        kernel = meanfield.crf_kernel(image_t, params)
        expected = meanfield.mean_field(logits_t, kernel, params).cpu().numpy()
    error = np.abs(scores - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"max relative error {error:.2e}"


def test_backend_returns_the_kind_it_was_given():
    import cupy

    params = CRFParams(filter_size=5, blur=2, iterations=3)
    image, logits = random_inputs(2, 2, 30, 41, 4, 3)
    image_nfhw = image.transpose(0, 3, 1, 2)
    expected = refine_on_gpu(image, logits, params)
    backend = cuda.CUDABackend(0)

    out_numpy = backend.run(image_nfhw, logits, params)
    assert isinstance(out_numpy, np.ndarray)
    out_cupy = backend.run(cupy.asarray(image_nfhw), cupy.asarray(logits), params)
    assert isinstance(out_cupy, cupy.ndarray)
    for out in (out_numpy, out_cupy.get()):
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    if torch.cuda.is_available():
        image_t = torch.from_numpy(image).cuda().permute(0, 3, 1, 2)  # a strided view
        out_torch = backend.run(image_t, torch.from_numpy(logits).cuda(), params)
        assert isinstance(out_torch, torch.Tensor) and out_torch.is_cuda
        np.testing.assert_allclose(out_torch.cpu().numpy(), expected, rtol=0, atol=1e-5)


def test_refine_selects_cuda_and_batches():
    from convcrf_cli.core import refine

    params = CRFParams(filter_size=7, blur=4)
    image, logits = random_inputs(4, 3, 48, 64, 21, 3)
    scores = refine(image, logits, params, device="cuda")
    assert scores.shape == logits.shape
    assert_matches_reference(scores, image, logits, params)


def _module_outputs(device: str) -> list[torch.Tensor]:
    """Scores, the logits' gradient and every learned parameter's gradient of ConvCRF (with
    the "+C" transform) under a cross-entropy loss, computed on ``device``, as CPU tensors."""
    import torch.nn.functional as F

    from convcrf_cli.torch import ConvCRF

    image, logits = random_inputs(5, 2, 45, 62, 21, 3)
    labels = torch.from_numpy(np.random.default_rng(5).integers(0, 21, (2, 45, 62)))
    crf = ConvCRF.from_params(CRFParams(filter_size=7, blur=3), 21, "compat,scales,weight,C")
    crf = crf.to(device)
    image_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).to(device)
    logits_t = torch.from_numpy(logits).to(device).requires_grad_()
    scores = crf(image_t, logits_t)
    F.cross_entropy(scores, labels.to(device)).backward()
    grads = [p.grad for p in crf.parameters() if p.requires_grad]
    return [t.detach().cpu() for t in (scores, logits_t.grad, *grads)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")
def test_torch_module_on_cuda_tensors_matches_cpu():
    for on_cpu, on_gpu in zip(_module_outputs("cpu"), _module_outputs("cuda"), strict=True):
        scale = float(on_cpu.abs().max())
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-4 * scale)
