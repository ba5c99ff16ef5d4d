"""The CUDA backend on a GPU against the float64 reference (skipped without CuPy and a device).

Every case of tests/test_cuda_shim.py runs on the device with all buffers poisoned with NaN; a
2048x2048 image is checked against the PyTorch mean field in float64 (itself checked against
tests/reference.py in test_meanfield.py), since the loop-based reference is too slow there.
The differentiable module on CUDA tensors (its mean field on the fused kernels:
fused_meanfield.py) is compared with itself on the CPU, gradients included, and the fused
mean field with the PyTorch one, on every case of tests/test_cuda_autograd.py and at 500x375.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import test_cuda_autograd
import torch
from test_cuda_shim import CASES, assert_matches_reference, random_inputs

from convcrf_cli import fused_meanfield, meanfield, phases
from convcrf_cli.backends import cuda, cuda_autograd, cuda_plan
from convcrf_cli.params import CRFParams

pytestmark = pytest.mark.gpu


def refine_on_gpu(image, logits, params, message_kernel=None, fuse=False, load_group=1):
    """image [N,H,W,F], logits [N,C,H,W] (NumPy) -> scores [N,C,H,W] (NumPy), every buffer
    NaN-poisoned before the kernels run; ``message_kernel`` (of cuda_plan.MESSAGE_KERNELS)
    overrides the backend's choice of message kernel, ``fuse`` fuses the iterations,
    ``load_group`` (of cuda_plan.LOAD_GROUPS) sets the module's group of loads. Where the
    fused iterations need more shared memory than the backend's configuration gives (k=11 at
    blur 2 with 21 classes), they get the device's opt-in limit (227 KiB on Hopper), so that
    every case runs them."""
    import cupy

    backend = cuda.CUDABackend(0)
    image_d = cupy.ascontiguousarray(cupy.asarray(image.transpose(0, 3, 1, 2)), dtype=cupy.float32)
    logits_d = cupy.asarray(logits, dtype=cupy.float32)
    config = backend.launch_config()
    if message_kernel is not None:
        config = dataclasses.replace(config, message_kernel=message_kernel)
    config = dataclasses.replace(config, fuse_message=fuse, load_group=load_group)
    plan = cuda_plan.MeanFieldPlan.create(image_d.shape, logits_d.shape, params, config)
    if fuse and not plan.fused:  # the window does not fit the backend's 64 KiB: all there is
        optin = cupy.cuda.Device(0).attributes["MaxSharedMemoryPerBlockOptin"]
        config = dataclasses.replace(config, shared_memory=optin)
        plan = cuda_plan.MeanFieldPlan.create(image_d.shape, logits_d.shape, params, config)
    assert message_kernel in (None, plan.message_kernel)
    assert plan.fused == fuse
    module = cuda._compiled_module(0, *plan.module)
    scores = cupy.full(logits_d.shape, cupy.nan, dtype=cupy.float32)

    def poisoned(shape, dtype):
        return cupy.full(shape, cupy.nan, dtype=dtype)

    cuda_plan.run_plan(plan, image_d, logits_d, scores, cuda._CuPyLauncher(module), poisoned)
    return scores.get()


def assert_case_matches_reference(case, **variant) -> None:
    """One case of tests/test_cuda_shim.py's CASES on the GPU (:func:`refine_on_gpu` with
    ``variant``) against the float64 reference."""
    height, width, classes, features, k, blur, init, n, its = case
    params = CRFParams(filter_size=k, blur=blur, init=init, iterations=its)
    image, logits = random_inputs(height * width + k, n, height, width, classes, features)
    scores = refine_on_gpu(image, logits, params, **variant)
    assert_matches_reference(scores, image, logits, params)


@pytest.mark.parametrize("message_kernel", cuda_plan.MESSAGE_KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_gpu_matches_reference(message_kernel, case):
    assert_case_matches_reference(case, message_kernel=message_kernel)


@pytest.mark.parametrize("message_kernel", cuda_plan.MESSAGE_KERNELS)
@pytest.mark.parametrize("k", [5, 7, 11, 13, 15])
def test_gpu_pascal_size_batch(message_kernel, k):
    """75x100 (a fifth of Pascal size, padded pooling), C=21, blur 4, a batch of 2, both inits."""
    for init in ("log", "softmax"):
        params = CRFParams(filter_size=k, blur=4, init=init, iterations=5)
        image, logits = random_inputs(k, 2, 75, 100, 21, 3)
        scores = refine_on_gpu(image, logits, params, message_kernel)
        assert_matches_reference(scores, image, logits, params)


@pytest.mark.parametrize(
    "case", [case for case in CASES if case[5] > 1] + [(75, 100, 21, 3, 13, 4, "log", 2, 5)]
)
def test_gpu_fused_iterations_match_reference(case):
    assert_case_matches_reference(case, fuse=True)


@pytest.mark.parametrize("load_group", [4, 8])
@pytest.mark.parametrize("case", CASES)
def test_gpu_load_groups_match_reference(load_group, case):
    for fuse in (False, True) if case[5] > 1 else (False,):
        assert_case_matches_reference(case, fuse=fuse, load_group=load_group)


def test_gpu_many_classes():
    params = CRFParams(filter_size=5, blur=2)
    image, logits = random_inputs(7, 1, 40, 33, 150, 3)
    assert_matches_reference(refine_on_gpu(image, logits, params), image, logits, params)


def test_gpu_batch_larger_than_one_launch():
    """440 images of 150 classes: more than one launch's grid holds (436), so two launches."""
    params = CRFParams(filter_size=7, blur=2, iterations=2)
    image, logits = random_inputs(3, 440, 6, 7, 150, 3)
    assert len(cuda_plan.launch_slices(440, 150, 7)) == 2
    scores = cuda.CUDABackend(0).run(
        np.ascontiguousarray(image.transpose(0, 3, 1, 2)), logits, params
    )
    for i in (0, 435, 436, 439):  # each side of the split
        assert_matches_reference(scores[i : i + 1], image[i : i + 1], logits[i : i + 1], params)


def test_gpu_2048_square_blur_one():
    params = CRFParams(filter_size=7, blur=1, iterations=5)
    image, logits = random_inputs(11, 1, 2048, 2048, 21, 3)
    plan = cuda_plan.MeanFieldPlan.create(
        (1, 3, 2048, 2048), logits.shape, params, cuda.CUDABackend(0).launch_config()
    )
    assert plan.message_kernel == "tiled"  # the backend's own choice at this size
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
    backend = cuda.CUDABackend(0, tune=False)  # the default plan, as refine_on_gpu

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


def test_gpu_tuning_times_every_variant_and_they_agree():
    """At 500x375 (C=21, blur 4, k=7) every launch variant runs on the device, none is left
    out for differing from the default plan, and the chosen one matches the reference."""
    params = CRFParams(filter_size=7, blur=4, iterations=5)
    image, logits = random_inputs(5, 1, 375, 500, 21, 3)
    image_nfhw = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
    backend = cuda.CUDABackend(0)
    scores = backend.run(image_nfhw, logits, params)
    [tuning] = backend.tunings
    print(tuning.describe())
    assert tuning.rejected == {}
    names = list(tuning.times_ms)
    assert names[:4] == ["per-cell", "split", "tiled", "fused"] and len(names) == 6
    untuned = cuda.CUDABackend(0, tune=False).run(image_nfhw, logits, params)
    np.testing.assert_allclose(scores, untuned, rtol=0, atol=1e-4)
    again = cuda.CUDABackend(0)  # the choice is remembered: no second timing
    np.testing.assert_array_equal(again.run(image_nfhw, logits, params), scores)
    assert again.tunings == []
    assert_matches_reference(scores, image, logits, params)


def test_class_argmax_on_the_device_equals_the_host():
    import cupy

    from convcrf_cli.pipeline import class_argmax

    scores = np.random.default_rng(0).normal(size=(3, 21, 37, 45)).astype(np.float32)
    top = scores[0].max(axis=0)
    scores[0, :3] = top - 1
    scores[0, 3] = scores[0, 7] = top  # tied maxima: the first class wins
    labels = cuda.CUDABackend(0).class_argmax(cupy.asarray(scores))
    assert labels.dtype == np.int32 and labels.shape == (3, 37, 45)
    assert (labels[0] == 3).all()
    np.testing.assert_array_equal(labels, np.stack([class_argmax(s) for s in scores]))


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


def _poison_cuda_cache() -> None:
    """Fill free memory of torch's caching allocator with NaN, so that buffers the fused
    mean field allocates (torch.empty) start as NaN rather than as earlier results."""
    torch.cuda.synchronize()
    block = torch.full((1 << 26,), float("nan"), device="cuda")
    del block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")
@pytest.mark.parametrize("case", test_cuda_autograd.CASES, ids=lambda c: "x".join(map(str, c)))
def test_fused_mean_field_on_gpu_matches_pytorch(case):
    params, logits, kernel, matrix, grad = test_cuda_autograd.inputs(case)
    block = cuda_autograd.class_block(logits.shape[1])
    launch = cuda_autograd.cuda_launcher(0, block)
    on_gpu = [None if t is None else t.cuda() for t in (logits, kernel, matrix, grad)]
    _poison_cuda_cache()
    scores, record = fused_meanfield.mean_field(*on_gpu[:2], params, 0.6, on_gpu[2], launch, block)
    grads = fused_meanfield.mean_field_backward(
        record, on_gpu[0], on_gpu[3], on_gpu[1], 0.6, on_gpu[2], True, launch
    )
    matrix64 = None if matrix is None else matrix.double()
    expected, expected_record = phases.mean_field(
        logits.double(), kernel.double(), params, 0.6, matrix64, record=True
    )
    expected_grads = phases.mean_field_backward(
        expected_record, grad.double(), kernel.double(), params, 0.6, matrix64, True
    )
    test_cuda_autograd.assert_close(scores.cpu(), expected, "scores")
    for name, got, want in zip(
        ("logits", "kernel", "weight", "matrix"), grads, expected_grads, strict=True
    ):
        if want is not None:
            test_cuda_autograd.assert_close(got.cpu(), want, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")
def test_fused_and_pytorch_mean_field_agree_at_voc_size():
    generator = torch.Generator().manual_seed(3)
    params = CRFParams()
    image = (torch.rand(1, 3, 375, 500, generator=generator) * 255).cuda()
    logits = torch.randn(1, 21, 375, 500, generator=generator).cuda()
    kernel = meanfield.crf_kernel(image, params)
    assert meanfield._fused_launcher(logits, kernel, None) is not None
    outputs = []
    for fused in (True, False):
        logits_ = logits.clone().requires_grad_()
        kernel_ = kernel.clone().requires_grad_()
        weight = torch.tensor(0.2, device="cuda", requires_grad=True)
        scores = meanfield.mean_field(logits_, kernel_, params, weight=weight, fused=fused)
        (scores * torch.linspace(-1, 1, 500, device="cuda")).sum().backward()
        outputs.append([scores.detach(), logits_.grad, kernel_.grad, weight.grad])
    for got, want in zip(*outputs, strict=True):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * scale)
