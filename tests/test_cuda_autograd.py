"""The module's mean field on the fused CUDA kernels (``fused_meanfield.py``, launching those of
``backends/cuda_autograd.py``), run on the CPU through the C++ shim, against the PyTorch
implementation in float64: the forward scores and every gradient (logits, kernel, weight, "+C"
matrix) of :mod:`convcrf_cli.phases`, whose hand-written backward is itself checked by
``gradcheck`` in test_phases.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from cuda_shim.cases import SMALL
from test_cuda_backend_run import rejected_problem

from convcrf_cli import fused_meanfield, meanfield, phases
from convcrf_cli.backends import cuda_autograd
from convcrf_cli.params import CRFParams

# (N, C, H, W, filter size, blur, init, iterations, with "+C")
CASES = [
    (2, 3, 13, 17, 3, 2, "softmax", 3, False),
    (1, 5, 11, 9, 5, 3, "log", 3, True),  # 5 classes: two chunks of the shim's 4, one partial
    (1, 6, 7, 10, 3, 1, "softmax", 2, True),  # blur 1: pooling and upsampling are identities
    (2, 2, 5, 6, 7, 4, "softmax", 3, False),  # smaller than the window and barely the blur
    (1, 4, 16, 12, 5, 4, "log", 1, False),  # one iteration; sizes multiples of the blur
    (1, 9, 19, 14, 3, 3, "softmax", 2, True),  # 9 classes: three chunks
]


def inputs(case, seed=0):
    n, c, height, width, k, blur, init, iterations, with_matrix = case
    generator = torch.Generator().manual_seed(seed)
    params = CRFParams(filter_size=k, blur=blur, init=init, iterations=iterations, col_schan=40)
    image = torch.rand(n, 3, height, width, generator=generator) * 255
    logits = torch.randn(n, c, height, width, generator=generator) * 2
    kernel = meanfield.crf_kernel(image, params)
    matrix = torch.randn(c, c, generator=generator) * 0.3 if with_matrix else None
    grad = torch.randn(n, c, height, width, generator=generator)
    return params, logits, kernel, matrix, grad


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    expected = expected.detach().numpy()
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(
        actual.detach().numpy(), expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_fused_forward_and_backward_match_pytorch(shim, case):
    params, logits, kernel, matrix, grad = inputs(case)
    weight = 0.6
    scores, record = fused_meanfield.mean_field(
        logits, kernel, params, weight, matrix, shim, shim.class_block, SMALL
    )
    matrix64 = None if matrix is None else matrix.double()
    expected, expected_record = phases.mean_field(
        logits.double(), kernel.double(), params, weight, matrix64, record=True
    )
    assert_close(scores, expected, "scores")

    grads = fused_meanfield.mean_field_backward(
        record, logits, grad, kernel, weight, matrix, True, shim
    )
    expected_grads = phases.mean_field_backward(
        expected_record, grad.double(), kernel.double(), params, weight, matrix64, True
    )
    names = ("logits", "kernel", "weight", "matrix")
    for name, got, want in zip(names, grads, expected_grads, strict=True):
        if want is None:
            assert got is None, name
        else:
            assert_close(got, want, name)


def test_fused_backward_without_the_logits_gradient(shim):
    params, logits, kernel, matrix, grad = inputs(CASES[1], seed=1)
    _, record = fused_meanfield.mean_field(
        logits, kernel, params, 0.3, matrix, shim, shim.class_block, SMALL
    )
    grad_logits, grad_kernel, grad_weight, _ = fused_meanfield.mean_field_backward(
        record, logits, grad, kernel, 0.3, matrix, False, shim
    )
    _, expected_record = phases.mean_field(
        logits.double(), kernel.double(), params, 0.3, matrix.double(), record=True
    )
    _, expected_kernel, expected_weight, _ = phases.mean_field_backward(
        expected_record, grad.double(), kernel.double(), params, 0.3, matrix.double(), False
    )
    assert grad_logits is None
    assert_close(grad_kernel, expected_kernel, "kernel")
    assert_close(grad_weight, expected_weight, "weight")


def test_class_block_balances_the_chunks():
    assert cuda_autograd.class_block(21) == 11
    assert cuda_autograd.class_block(16) == 16
    assert cuda_autograd.class_block(2) == 2
    assert cuda_autograd.class_block(150) == 15


def test_cpu_tensors_never_take_the_fused_path():
    logits = torch.zeros(1, 2, 4, 4)
    kernel = torch.zeros(1, 3, 3, 4, 4)
    assert meanfield._fused_launcher(logits, kernel, None) is None


@pytest.mark.parametrize("fused", [True, False])
def test_only_fused_true_asks_for_the_kernels(monkeypatch, fused):
    asked = []

    def no_launcher(*tensors):
        asked.append(tensors)
        return None  # as where CuPy cannot launch them: the PyTorch implementation runs

    monkeypatch.setattr(meanfield, "_fused_launcher", no_launcher)
    params, logits, kernel, _, _ = inputs(CASES[0])
    scores = meanfield.mean_field(logits, kernel, params, fused=fused)
    expected, _ = phases.mean_field(logits, kernel, params, params.weight)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    assert len(asked) == (1 if fused else 0)


class _OnCUDA(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device, for the choice of the fused path."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_a_class_count_whose_module_does_not_compile_runs_on_pytorch(fake_cupy):
    # 5 classes, one chunk of 5: a module of its own (checking the device compiles 4)
    fake_cupy.rejected.add((5, 1))
    params, logits, kernel, _, _ = inputs(CASES[1])
    on_cuda = logits.as_subclass(_OnCUDA), kernel.as_subclass(_OnCUDA)
    warning = re.escape(f"{rejected_problem(5)}; the mean field runs as PyTorch operations")
    with pytest.warns(RuntimeWarning, match=warning):
        assert meanfield._fused_launcher(*on_cuda, None) is None
    with pytest.warns(RuntimeWarning, match=warning):
        scores = meanfield.mean_field(*on_cuda, params)
    expected, _ = phases.mean_field(logits, kernel, params, params.weight)
    np.testing.assert_array_equal(scores.as_subclass(torch.Tensor).numpy(), expected.numpy())
    assert fake_cupy.attempted == [(4, 1), (5, 1)]  # the rejected one is not tried again
