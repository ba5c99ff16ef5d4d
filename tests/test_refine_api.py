"""``refine``'s contract with library callers: accepted array kinds, and a clear error for
every input it cannot take (InputError for shapes, dtypes and values; TypeError for params
and device of the wrong type)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference
import torch

from convcrf_cli import CRFParams, DeviceError, InputError, refine

PARAMS = CRFParams(filter_size=3, blur=2, iterations=2)
RNG = np.random.default_rng(5)
IMAGE = RNG.uniform(0, 255, (6, 7, 3))
LOGITS = RNG.normal(size=(3, 6, 7))


def _expected() -> np.ndarray:
    return reference.refine(IMAGE, LOGITS, PARAMS)


def test_lists_torch_bfloat16_and_a_torch_device_are_accepted():
    np.testing.assert_allclose(
        refine(IMAGE.tolist(), LOGITS.tolist(), PARAMS), _expected(), rtol=1e-4, atol=1e-5
    )
    image, logits = torch.from_numpy(IMAGE), torch.from_numpy(LOGITS).to(torch.bfloat16)
    scores = refine(image, logits, PARAMS, device=torch.device("cpu"))
    rounded = logits.float().numpy().astype(np.float64)  # the values bfloat16 holds
    np.testing.assert_allclose(
        scores, reference.refine(IMAGE, rounded, PARAMS), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("image", "logits", "message"),
    [
        (IMAGE * 1j, LOGITS, "image must hold real numbers, got dtype complex128"),
        (IMAGE, LOGITS.astype(object), "logits must hold real numbers, got dtype object"),
        (IMAGE.astype(str), LOGITS, "image must hold real numbers, got dtype <U"),
        (torch.from_numpy(IMAGE * 1j), LOGITS, "image must hold real numbers, got torch.compl"),
        ([[1, 2], [3]], LOGITS, "image is not a rectangular array"),
        (IMAGE, LOGITS * 1e39, "logits hold NaN, infinite values or values beyond the float32"),
        (IMAGE * 1e40, LOGITS, "image hold NaN, infinite values or values beyond the float32"),
        (torch.from_numpy(IMAGE * 1e40), LOGITS, "image hold NaN, infinite values or values"),
        (np.zeros((0, 7, 3)), np.zeros((3, 0, 7)), r"no pixels \(size 0×7\)"),
        (np.zeros((6, 7, 0)), LOGITS, r"image has no channels \(shape \(6, 7, 0\)\)"),
        (np.zeros((1, 6, 7, 3)), LOGITS, r"image must be \[H,W\] or \[H,W,F\] for logits of "
         r"shape \(3, 6, 7\), got shape \(1, 6, 7, 3\)"),
        (np.zeros(7), LOGITS, r"got shape \(7,\)"),
        (IMAGE, LOGITS[None], r"image batch 6 and logits batch 1 differ \(image shape "
         r"\(6, 7, 3\) read as \[N,H,W\] or \[N,H,W,F\]"),
        (IMAGE[:, :5], LOGITS, r"image size 6×5 \(shape \(6, 5, 3\)\) and logits size 6×7"),
    ],
)  # fmt: skip
def test_inputs_that_do_not_fit_are_input_errors(image, logits, message):
    with pytest.raises(InputError, match=message):
        refine(image, logits, PARAMS)


@pytest.mark.parametrize("half", [np.float16, torch.float16], ids=["numpy", "torch"])
@pytest.mark.parametrize("which", ["image", "logits"])
def test_float16_infinities_are_input_errors(half, which):
    arrays = {"image": IMAGE.copy(), "logits": LOGITS.copy()}
    arrays[which][1, 2, 0] = np.inf
    if half is np.float16:
        image, logits = (arrays[name].astype(half) for name in ("image", "logits"))
    else:
        image, logits = (torch.from_numpy(arrays[name]).to(half) for name in ("image", "logits"))
    with pytest.raises(InputError, match=f"{which} hold NaN, infinite values or values beyond"):
        refine(image, logits, PARAMS)


def test_float16_up_to_its_largest_value_is_fine():
    image = np.full((6, 7, 3), np.finfo(np.float16).max, np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # was: overflow casting 3.4e38 to float16
        scores = refine(image, LOGITS.astype(np.float16), PARAMS)
    assert np.isfinite(scores).all()


def test_large_values_within_float32_are_fine():
    scores = refine(IMAGE, LOGITS * 1e30, PARAMS)
    assert np.isfinite(scores).all()


@pytest.mark.parametrize(
    "overflowing",
    [
        {"weight": 1e38},
        {"pos_compat": 3e38, "col_compat": 3e38},
        {"weight": 3e38, "unary_weight": -3e38},
    ],
)
def test_a_mean_field_overflowing_float32_is_an_input_error(overflowing):
    # Parameters within float32's range whose products are not: the scores were all NaN.
    params = CRFParams(filter_size=3, blur=2, iterations=2, **overflowing)
    with pytest.raises(InputError, match="the mean field gave NaN or infinite scores"):
        refine(IMAGE, LOGITS, params)


def test_params_and_device_of_the_wrong_type_are_type_errors():
    with pytest.raises(TypeError, match="params must be a CRFParams or None, got str; give the"):
        refine(IMAGE, LOGITS, "cpu")
    with pytest.raises(TypeError, match="params must be a CRFParams or None, got dict"):
        refine(IMAGE, LOGITS, PARAMS.to_dict())
    with pytest.raises(TypeError, match="device must be 'cpu', 'cuda', 'cuda:N', 'auto' or a"):
        refine(IMAGE, LOGITS, PARAMS, device=None)
    with pytest.raises(DeviceError, match="gpu"):
        refine(IMAGE, LOGITS, PARAMS, device="gpu")
