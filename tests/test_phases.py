"""The pooling-phase layout and the mean field's hand-written backward.

The layout's adjoints are checked with the dot-product identity against independent forward
operations (``F.avg_pool2d``, the float64 reference's upsampling); the backward against finite
differences (``torch.autograd.gradcheck``) on sizes that are not multiples of the blur.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch

from convcrf_cli import CRFParams, meanfield
from convcrf_cli.phases import PhaseLayout

SIZES = [(7, 9, 2), (5, 5, 3), (9, 6, 4), (3, 4, 1), (2, 7, 3)]  # height, width, blur


@pytest.mark.parametrize("height, width, blur", SIZES)
def test_gather_scatter_round_trip(height, width, blur):
    full = torch.randn(2, 3, height, width, dtype=torch.float64)
    layout = PhaseLayout(height, width, blur, full)
    torch.testing.assert_close(layout.scatter(layout.gather(full)), full, rtol=0, atol=0)


@pytest.mark.parametrize("height, width, blur", SIZES)
def test_spread_is_the_adjoint_of_average_pooling(height, width, blur):
    full = torch.randn(2, 3, height, width, dtype=torch.float64)
    coarse_grad = torch.randn_like(meanfield.pool(full, blur))
    layout = PhaseLayout(height, width, blur, full)
    forward = torch.sum(meanfield.pool(full, blur) * coarse_grad)
    adjoint = torch.sum(layout.gather(full) * layout.spread(coarse_grad / layout.counts))
    torch.testing.assert_close(adjoint, forward)


@pytest.mark.parametrize("height, width, blur", SIZES)
def test_blend_adjoint_is_the_adjoint_of_upsampling(height, width, blur):
    rng = np.random.default_rng(height * width)
    layout = PhaseLayout(height, width, blur, torch.zeros(()))
    coarse = rng.normal(size=(3, layout.h, layout.w))
    grad = rng.normal(size=(3, height, width))
    forward = np.sum(reference.upsample_crop(coarse, blur, height, width) * grad)
    grad_phases = layout.gather(torch.from_numpy(grad)[None])
    adjoint = np.sum(coarse * layout.blend_adjoint(grad_phases)[0].numpy())
    np.testing.assert_allclose(adjoint, forward, rtol=1e-12)


def _inputs(height, width, blur, k, classes=3, n=2, seed=0):
    """float64 logits, a positive kernel, a weight and a compatibility matrix, all leaves."""
    gen = torch.Generator().manual_seed(seed)
    h, w = -(-height // blur), -(-width // blur)
    logits = torch.randn(n, classes, height, width, generator=gen, dtype=torch.float64)
    kernel = torch.rand(n, k, k, h, w, generator=gen, dtype=torch.float64)
    matrix = 0.3 * torch.randn(classes, classes, generator=gen, dtype=torch.float64)
    weight = torch.tensor(0.7, dtype=torch.float64)
    return [t.requires_grad_() for t in (logits, kernel, weight, matrix)]


@pytest.mark.parametrize(
    "height, width, blur, k, init, with_matrix, iterations",
    [
        (7, 9, 2, 3, "softmax", True, 3),
        (5, 5, 3, 3, "log", False, 3),
        (9, 6, 4, 1, "softmax", False, 3),
        (3, 4, 1, 5, "log", True, 3),
        (2, 7, 3, 3, "softmax", False, 3),
        (5, 6, 2, 3, "log", False, 1),
    ],
)
def test_mean_field_backward_matches_finite_differences(
    height, width, blur, k, init, with_matrix, iterations
):
    params = CRFParams(filter_size=k, blur=blur, iterations=iterations, init=init, unary_weight=1.3)
    logits, kernel, weight, matrix = _inputs(height, width, blur, k)

    def scores(logits, kernel, weight, matrix):
        return meanfield.mean_field(
            logits, kernel, params, weight=weight, compat_matrix=matrix if with_matrix else None
        )

    assert torch.autograd.gradcheck(scores, (logits, kernel, weight, matrix))


def test_recording_forward_equals_inference_forward():
    params = CRFParams(filter_size=3, blur=3, iterations=4)
    logits, kernel, weight, matrix = _inputs(8, 10, 3, 3)
    with_grad = meanfield.mean_field(logits, kernel, params, weight=weight, compat_matrix=matrix)
    with torch.no_grad():
        plain = meanfield.mean_field(logits, kernel, params, weight=weight, compat_matrix=matrix)
    torch.testing.assert_close(with_grad.detach(), plain, rtol=0, atol=0)


def test_gradient_of_some_inputs_only():
    # The kernel alone (no logits gradient: the backward stops early), then the logits alone.
    params = CRFParams(filter_size=3, blur=2, iterations=3)
    logits, kernel, weight, _ = _inputs(6, 7, 2, 3)
    outer = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    loss = torch.sum(meanfield.mean_field(logits, kernel, params, weight=weight) * outer)
    expected = torch.autograd.grad(loss, (logits, kernel))
    for leaf, want in zip((kernel, logits), reversed(expected), strict=True):
        inputs = [t.detach().requires_grad_(t is leaf) for t in (logits, kernel)]
        scores = meanfield.mean_field(*inputs, params, weight=weight.item())
        (got,) = torch.autograd.grad(torch.sum(scores * outer), inputs[(0, 1)[leaf is kernel]])
        torch.testing.assert_close(got, want)
