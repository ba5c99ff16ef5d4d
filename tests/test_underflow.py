"""exp kept off torch's slow path: every result equals torch.exp's bit for bit, except the
ones at or below exp(EXP_CUTOFF), which are 0 (and their gradient with them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference
import torch

from convcrf_cli import refine
from convcrf_cli.params import CRFParams
from convcrf_cli.underflow import EXP_CUTOFF, exp_or_zero, exp_or_zero_

VALUES = torch.tensor(
    [0.0, -1.5, -50.0, -86.9, EXP_CUTOFF + 1e-4, EXP_CUTOFF, -87.2, -88.0, -103.0, -1e4, 3.0]
)


def _expected(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > EXP_CUTOFF, torch.exp(x), torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_or_zero_is_exp_above_the_cutoff_and_zero_at_or_below(dtype):
    x = VALUES.to(dtype)
    out = torch.full_like(x, float("nan"))
    assert exp_or_zero(x, out=out) is out
    torch.testing.assert_close(out, _expected(x), rtol=0, atol=0)
    assert torch.equal(x, VALUES.to(dtype))  # the input is left alone
    assert (out[x <= EXP_CUTOFF] == 0).all() and (out[x > EXP_CUTOFF] >= math.exp(EXP_CUTOFF)).all()


def test_exp_or_zero_in_place_and_its_gradient():
    x = VALUES.clone().requires_grad_()
    y = exp_or_zero_(x.clone())
    torch.testing.assert_close(y.detach(), _expected(VALUES), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, _expected(VALUES), rtol=0, atol=0)  # d exp = exp


@pytest.mark.parametrize("init", ["softmax", "log"])
def test_confident_logits_match_the_reference(init):
    """Logits whose margins reach hundreds (log-probabilities far below the cutoff) refine as
    the float64 reference does."""
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 255, (19, 23, 3))
    logits = (rng.standard_normal((4, 19, 23)) * 150).astype(np.float32)
    params = CRFParams(filter_size=5, blur=2, iterations=3, init=init)
    got = refine(image, logits, params)
    want = reference.refine(image, logits, params)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
