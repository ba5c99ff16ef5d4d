"""The CPU backend against the float64 reference (tests/reference.py) and hand-computed cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference
import torch

from convcrf_cli import CRFParams, meanfield, refine, window
from convcrf_cli.torch import ConvCRF

RTOL = 1e-4


def _random_case(rng, height, width, features, classes):
    image = rng.uniform(0, 255, (height, width, features))
    logits = rng.normal(0, 3, (classes, height, width)).astype(np.float32)
    return image, logits


def _assert_close(actual, expected):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize(
    "k, blur, size, features, classes, init",
    [
        (k, b, size, f, c, init)
        for (k, b), size, f, c, init in zip(
            itertools.product((3, 5, 7, 11), (1, 2, 3, 4)),
            itertools.cycle([(13, 17), (9, 10), (2, 3), (21, 14), (1, 1), (6, 31)]),
            itertools.cycle([3, 1, 4]),
            itertools.cycle([2, 21]),
            itertools.cycle(["log", "softmax", "softmax", "log", "log"]),
        )
    ],
)
def test_cpu_matches_reference(k, blur, size, features, classes, init):
    rng = np.random.default_rng(k * 100 + blur)
    image, logits = _random_case(rng, *size, features, classes)
    params = CRFParams(filter_size=k, blur=blur, init=init)
    _assert_close(
        refine(image, logits, params, device="cpu"), reference.refine(image, logits, params)
    )


def test_default_parameters_and_original_preset():
    rng = np.random.default_rng(7)
    image, logits = _random_case(rng, 23, 29, 3, 21)
    for params in (CRFParams(), CRFParams(filter_size=11, blur=4, init="log")):
        _assert_close(
            refine(image.astype(np.uint8), logits, params),
            reference.refine(image.astype(np.uint8), logits, params),
        )


def test_a_blur_beyond_the_image_runs_as_its_larger_side_with_the_same_result(monkeypatch):
    # Every blur from max(H, W) on pools the image into one cell, but the phase layout holds
    # blur² phases: --blur 100000 on a 24×32 image ran for minutes, gigabytes growing.
    rng = np.random.default_rng(11)
    image, logits = _random_case(rng, 6, 9, 3, 4)
    expected = reference.refine(image, logits, CRFParams(blur=40))
    _assert_close(refine(image, logits, CRFParams(blur=9)), expected)
    blurs = []

    class Recording:
        def run(self, image, logits, params):
            blurs.append(params.blur)
            return np.zeros(logits.shape, np.float32)

    refine(image, logits, CRFParams(blur=10**7), device=Recording())
    assert blurs == [9]
    module = ConvCRF.from_params(CRFParams(blur=10**7), num_classes=4)
    crf_kernel = meanfield.crf_kernel
    monkeypatch.setattr(
        meanfield, "crf_kernel", lambda i, p, **kw: blurs.append(p.blur) or crf_kernel(i, p, **kw)
    )
    to_tensor = torch.from_numpy
    scores = module(to_tensor(image.transpose(2, 0, 1)[None]).float(), to_tensor(logits[None]))
    assert blurs == [9, 9]  # the module's too
    _assert_close(scores[0].detach().numpy(), expected)


def test_batch_equals_single_images():
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (3, 11, 13, 3))
    logits = rng.normal(0, 2, (3, 4, 11, 13)).astype(np.float32)
    params = CRFParams(filter_size=5, blur=2)
    batch = refine(images, logits, params)
    assert batch.shape == (3, 4, 11, 13) and batch.dtype == np.float32
    for i in range(3):
        _assert_close(batch[i], reference.refine(images[i], logits[i], params))


def test_grayscale_image_and_torch_input():
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 255, (10, 12))
    logits = rng.normal(0, 2, (3, 10, 12)).astype(np.float32)
    params = CRFParams(filter_size=3, blur=1)
    expected = reference.refine(image, logits, params)
    _assert_close(refine(image, logits, params), expected)
    _assert_close(refine(torch.from_numpy(image), torch.from_numpy(logits), params), expected)


@pytest.mark.parametrize("blur", [1, 2])
def test_sixteen_bit_image_at_high_values_matches_reference(blur):
    # A smooth 16-bit image near 60000: features I / col_schan ~ 4600 lose ~3e-4 in float32,
    # so dividing before the differences put the scores 4e-4 (relative) off the reference.
    rng = np.random.default_rng(9)
    image = np.clip(60000 + rng.normal(0, 13, (24, 24)), 0, 65535).astype(np.uint16)
    logits = rng.normal(0, 2, (3, 24, 24)).astype(np.float32)
    params = CRFParams(filter_size=5, blur=blur, init="log")
    _assert_close(refine(image, logits, params), reference.refine(image, logits, params))


@pytest.mark.parametrize("field", ["pos_sdims", "col_schan"])
def test_tiny_feature_scales_give_finite_scores(field):
    # 19 / 2e-38 overflows float32: features divided before their differences gave inf - inf,
    # NaN scores; the reference (float64) has 0 off the centre, which the differences give too.
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)
    logits = rng.normal(0, 1, (3, 20, 20)).astype(np.float32)
    params = CRFParams(filter_size=3, blur=1, **{field: 2e-38})
    scores = refine(image, logits, params)
    assert np.isfinite(scores).all()
    _assert_close(scores, reference.refine(image, logits, params))


def test_pool_padding_hand_computed():
    # length 10, blur 4: pad total 2, 1 each side; cells cover rows [-1,3), [3,7), [7,11).
    assert meanfield.pool_padding(10, 4) == 1
    # length 9, blur 4: pad total 3 -> ceil(1.5) = 2 on each side; cells [-2,2), [2,6), [6,10).
    assert meanfield.pool_padding(9, 4) == 2
    row = torch.arange(9.0).view(1, 1, 1, 9)
    pooled = meanfield.pool(row.expand(1, 1, 4, 9), 4)
    # columns: mean(0,1) = 0.5, mean(2..5) = 3.5, mean(6..8) = 7 (padded cells not counted)
    np.testing.assert_allclose(pooled[0, 0, 0].numpy(), [0.5, 3.5, 7.0])
    assert pooled.shape[-2:] == (1, 3)


def test_upsample_hand_computed():
    # The reference's upsampling, which the phase layout's blends are checked against.
    # Coarse row [0, 4], blur 2, output 4 -> sources -0.25 (clamped 0), 0.25, 0.75, 1.25 (-> 1).
    coarse = np.array([[[0.0, 4.0]]])
    np.testing.assert_allclose(reference.upsample_crop(coarse, 2, 1, 4)[0, 0], [0, 1, 3, 4])
    # Odd width 3 with blur 2: pad 1 on the left, crop columns 1..3 of the 4 upsampled.
    np.testing.assert_allclose(reference.upsample_crop(coarse, 2, 1, 3)[0, 0], [1, 3, 4])


def test_gaussian_zero_outside_window_and_centre_one():
    features = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # [1,1,2,2]
    g = meanfield.gaussian_kernel(features, 3, 1.0)[0]  # [3,3,2,2]
    # Centre offset is exp(0) = 1 everywhere.
    np.testing.assert_allclose(g[1, 1].numpy(), np.ones((2, 2)))
    # Pixel (0,0): up or left neighbours lie outside -> 0.
    assert g[0, :, 0, 0].abs().sum() == 0 and g[:, 0, 0, 0].abs().sum() == 0
    # Pixel (0,0) -> right neighbour (0,1): diff 1 -> exp(-0.5); down (1,0): diff 2 -> exp(-2).
    np.testing.assert_allclose(g[1, 2, 0, 0].item(), np.exp(-0.5), rtol=1e-6)
    np.testing.assert_allclose(g[2, 1, 0, 0].item(), np.exp(-2.0), rtol=1e-6)
    np.testing.assert_allclose(g[2, 2, 0, 0].item(), np.exp(-4.5), rtol=1e-6)


def test_window_sum_on_tiny_grid():
    # 1 class on a 1x3 grid, uniform kernel of ones: each output sums its in-grid window.
    q = torch.tensor([[[[1.0, 2.0, 4.0]]]])
    kernel = torch.ones(1, 3, 3, 1, 3)
    np.testing.assert_allclose(window.window_sum(q, kernel)[0, 0, 0].numpy(), [3.0, 7.0, 6.0])


@pytest.mark.parametrize("k, h, w", [(1, 2, 3), (3, 4, 5), (5, 3, 4), (7, 2, 6)])
@pytest.mark.parametrize("run", [None, 1, 2])
def test_window_sum_adjoints(k, h, w, run, monkeypatch):
    # <window_sum(q, K), g> = <q, adjoint(g, K)> = <K, products(g, q)>, windows wider than
    # the grid included; a small budget splits window rows into runs of `run` offsets.
    if run is not None:
        monkeypatch.setattr(window, "PRODUCT_BUDGET", run * 2 * 3 * h * w)
    torch.manual_seed(k)
    q = torch.randn(2, 3, h, w, dtype=torch.float64)
    kernel = torch.rand(2, k, k, h, w, dtype=torch.float64)
    grad = torch.randn(2, 3, h, w, dtype=torch.float64)
    forward = torch.sum(window.window_sum(q, kernel) * grad)
    torch.testing.assert_close(torch.sum(q * window.window_sum_adjoint(grad, kernel)), forward)
    torch.testing.assert_close(torch.sum(kernel * window.window_products(grad, q, k)), forward)


def test_refine_rejects_mismatched_sizes():
    from convcrf_cli import InputError

    with pytest.raises(InputError, match="size 4×5 .shape .4, 5, 3.. and logits size 4×6"):
        refine(np.zeros((4, 5, 3)), np.zeros((2, 4, 6), np.float32))


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize(("which", "bad"), [("image", np.nan), ("logits", np.inf)])
def test_refine_rejects_nan_and_infinite_inputs(library, which, bad):
    from convcrf_cli import InputError

    rng = np.random.default_rng(0)
    arrays = {"image": rng.uniform(0, 255, (6, 7, 3)), "logits": rng.normal(size=(2, 6, 7))}
    arrays[which][1, 2, 0] = bad
    image, logits = (
        (torch.from_numpy(arrays[name]) if library == "torch" else arrays[name])
        for name in ("image", "logits")
    )
    with pytest.raises(InputError, match=f"{which} hold NaN, infinite values or values beyond"):
        refine(image, logits, CRFParams(filter_size=3, iterations=1))
    # unchecked, the NaN runs through the mean field, and its scores are refused
    with pytest.raises(InputError, match="the mean field gave NaN or infinite scores"):
        refine(image, logits, CRFParams(filter_size=3, iterations=1), check_finite=False)
