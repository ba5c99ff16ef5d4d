"""The differentiable ConvCRF module against ``refine``, the float64 reference and autograd."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference
import torch
from torch.func import functional_call

from convcrf_cli import CRFParams, ParamsError, refine
from convcrf_cli.params import PRESETS
from convcrf_cli.torch import DEFAULT_LEARN, LEARNABLE_GROUPS, ConvCRF, parse_learn

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _case(seed, height, width, features, classes):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (height, width, features)).astype(np.float32)
    logits = rng.normal(0, 3, (classes, height, width)).astype(np.float32)
    return image, logits


def _module_scores(module, image, logits):
    """Run ``module`` on one ``[H,W,F]`` image and ``[C,H,W]`` logits; ``[C,H,W]`` NumPy."""
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        return module(image_t, torch.from_numpy(logits)[None])[0].numpy()


@pytest.mark.parametrize(
    "params",
    [
        CRFParams(),
        CRFParams(filter_size=11, blur=4, init="log"),
        CRFParams(filter_size=5, blur=1, iterations=3, pos_sdims=2.0, col_schan=30.0),
        CRFParams(filter_size=3, blur=3, pos_compat=0.5, col_compat=4.0, weight=0.7),
    ],
)
def test_forward_equals_refine(params):
    image, logits = _case(1, 29, 22, 3, 5)
    module = ConvCRF.from_params(params, num_classes=5)
    expected = refine(image, logits, params, device="cpu")
    np.testing.assert_allclose(_module_scores(module, image, logits), expected, rtol=0, atol=1e-5)


def test_potts_and_identity_at_init_equal_plain():
    """+C starts at the zero matrix (Potts model) and +T at the identity: same output."""
    params = CRFParams(filter_size=5, blur=2)
    image, logits = _case(2, 17, 19, 3, 4)
    module = ConvCRF.from_params(params, num_classes=4, learn="compat,scales,weight,C,T")
    assert torch.equal(module.compat_transform, torch.zeros(4, 4))
    assert torch.equal(module.feature_transform, torch.eye(3))
    expected = refine(image, logits, params, device="cpu")
    np.testing.assert_allclose(_module_scores(module, image, logits), expected, rtol=0, atol=1e-5)


def _reference_with_transforms(image, logits, p, compat, features):
    """The float64 mean field of the reference with msg <- msg + compat·msg and colour
    features from features·I."""
    image = np.asarray(image, dtype=np.float64).transpose(2, 0, 1)
    transformed = np.einsum("gf,fhw->ghw", features, image)
    height, width = image.shape[1:]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pos = np.stack([rows, cols]).astype(np.float64) / p.pos_sdims
    g_pos = reference.gaussian(reference.avg_pool(pos, p.blur), p.filter_size)
    g_col = reference.gaussian(reference.avg_pool(transformed / p.col_schan, p.blur), p.filter_size)
    kern = p.pos_compat * g_pos + p.col_compat * g_col
    lg = reference.log_softmax(np.asarray(logits, dtype=np.float64))
    q = lg if p.init == "log" else reference.softmax(lg)
    for i in range(p.iterations):
        msg = reference.message(q, kern, p.blur)
        msg = msg + np.einsum("dc,chw->dhw", compat, msg)
        q = (p.unary_weight - p.weight) * lg + p.weight * msg
        if i < p.iterations - 1:
            q = reference.softmax(q)
    return q


def test_learned_transforms_match_float64_reference():
    params = CRFParams(filter_size=5, blur=2, iterations=3)
    image, logits = _case(3, 14, 11, 3, 4)
    rng = np.random.default_rng(4)
    compat = rng.normal(0, 0.3, (4, 4))
    features = np.eye(3) + rng.normal(0, 0.3, (3, 3))
    module = ConvCRF(params, 4, learn="C,T", compat_transform=compat, feature_transform=features)
    expected = _reference_with_transforms(image, logits, params, compat, features)
    actual = _module_scores(module, image, logits)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_gradcheck_all_learnable_parameters():
    params = CRFParams(filter_size=3, blur=2, iterations=2, col_schan=0.5, pos_sdims=1.5)
    torch.manual_seed(0)
    module = ConvCRF.from_params(
        params, num_classes=3, learn=LEARNABLE_GROUPS, num_features=2
    ).double()
    with torch.no_grad():  # move away from the zero / identity start so every term matters
        module.compat_transform.normal_(0, 0.3)
        module.feature_transform.add_(torch.randn(2, 2, dtype=torch.float64) * 0.3)
    image = torch.rand(2, 2, 5, 6, dtype=torch.float64)
    logits = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(
        [
            "log_pos_sdims",
            "log_col_schan",
            "pos_compat",
            "col_compat",
            "weight",
            "compat_transform",
            "feature_transform",
        ]
    )
    values = tuple(module.get_parameter(name).detach().clone().requires_grad_() for name in names)

    def scores(logits, *tensors):
        batch = torch.cat([logits, logits.flip(-1)])  # two images, few unknowns
        return functional_call(module, dict(zip(names, tensors, strict=True)), (image, batch))

    assert torch.autograd.gradcheck(scores, (logits, *values), eps=1e-6, atol=1e-5)


def test_only_learned_groups_require_grad():
    module = ConvCRF.from_params(CRFParams(), num_classes=2, learn="scales")
    learned = {name for name, p in module.named_parameters() if p.requires_grad}
    assert learned == {"log_pos_sdims", "log_col_schan"}
    assert module.compat_transform is None and module.feature_transform is None


def test_parse_learn_rejects_unknown_and_empty():
    assert parse_learn("compat, C") == ("compat", "C")
    with pytest.raises(ParamsError, match="unknown learnable group"):
        parse_learn("compat,colour")
    with pytest.raises(ParamsError, match="nothing to learn"):
        parse_learn(",")


def test_to_params_from_params_round_trip():
    params = CRFParams(pos_sdims=2.5, col_schan=40.0, pos_compat=1.5, col_compat=7.0, weight=0.4)
    back = ConvCRF.from_params(params, num_classes=3).to_params()
    for field in ("pos_sdims", "col_schan", "pos_compat", "col_compat", "weight"):
        assert getattr(back, field) == pytest.approx(getattr(params, field), rel=1e-6)
    assert (back.filter_size, back.blur, back.iterations, back.init) == (
        params.filter_size,
        params.blur,
        params.iterations,
        params.init,
    )


SCALARS = ("log_pos_sdims", "log_col_schan", "pos_compat", "col_compat", "weight")


@pytest.mark.parametrize(
    "params",
    [
        *PRESETS.values(),
        CRFParams(pos_sdims=7.0, col_schan=0.3, pos_compat=0.1, col_compat=1e-3, weight=-0.7),
        CRFParams(pos_sdims=123.456, col_schan=1e-4, pos_compat=-2.5, weight=1e5),
        CRFParams(pos_sdims=1.0, col_schan=2.5e-3, col_compat=0.0, weight=0.0),
    ],
)
def test_untrained_params_come_back_exactly(params, tmp_path):
    module = ConvCRF.from_params(params, num_classes=3)
    assert module.to_params() == params
    path = tmp_path / "p.json"
    module.save(path)
    assert CRFParams.load(path) == params
    assert ConvCRF.load(path, num_classes=3).to_params() == params


def test_trained_parameters_round_trip_bit_for_bit(tmp_path):
    module = ConvCRF.from_params(CRFParams(), num_classes=3)
    torch.manual_seed(0)
    for _ in range(50):
        with torch.no_grad():
            for name in SCALARS:
                module.get_parameter(name).add_(torch.randn(()) * 0.3)
        again = ConvCRF.from_params(module.to_params(), num_classes=3)
        for name in SCALARS:
            assert torch.equal(again.get_parameter(name), module.get_parameter(name)), name
    path = tmp_path / "p.json"
    module.save(path)
    loaded = ConvCRF.load(path, num_classes=3)
    for name in SCALARS:
        assert torch.equal(loaded.get_parameter(name), module.get_parameter(name)), name


def test_save_load_plain_file_is_read_by_crfparams(tmp_path):
    module = ConvCRF.from_params(CRFParams(col_schan=21.0), num_classes=3)
    path = tmp_path / "missing" / "p.json"  # directories are created
    module.save(path)
    assert CRFParams.load(path).col_schan == pytest.approx(21.0, rel=1e-6)


def test_save_load_with_transforms(tmp_path):
    image, logits = _case(5, 12, 13, 3, 4)
    module = ConvCRF.from_params(CRFParams(filter_size=5, blur=2), 4, learn="C,T")
    with torch.no_grad():
        module.compat_transform.copy_(torch.randn(4, 4) * 0.2)
        module.feature_transform.copy_(torch.eye(3) + torch.randn(3, 3) * 0.2)
    path = tmp_path / "learned.json"
    module.save(path)
    data = json.loads(path.read_text())
    assert np.asarray(data["compat_transform"]).shape == (4, 4)
    assert np.asarray(data["feature_transform"]).shape == (3, 3)
    loaded = ConvCRF.load(path)
    assert loaded.num_classes == 4 and loaded.num_features == 3
    np.testing.assert_array_equal(
        _module_scores(loaded, image, logits), _module_scores(module, image, logits)
    )
    with pytest.raises(ParamsError, match="compat_transform and feature_transform"):
        CRFParams.load(path)
    with pytest.raises(ParamsError, match="data have 5 classes"):
        ConvCRF.load(path, num_classes=5)


def test_load_rejects_bad_matrix(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"compat_transform": [[1.0, 2.0]]}))
    with pytest.raises(ParamsError, match=r"bad\.json: compat_transform must be a square"):
        ConvCRF.load(path)


def test_forward_rejects_mismatched_classes():
    module = ConvCRF.from_params(CRFParams(), num_classes=3, learn="C")
    with pytest.raises(ValueError, match="logits have 4 classes"):
        module(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_forward_rejects_logits_that_are_not_floating_point(dtype):
    # were torch's "log_softmax_kernel_impl not implemented for 'Long'" from deep inside
    module = ConvCRF.from_params(CRFParams(filter_size=3), num_classes=3)
    with pytest.raises(ValueError, match=f"logits must be a floating-point tensor, got {dtype}"):
        module(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=dtype))


def _saved_with_matrices(tmp_path, learn):
    module = ConvCRF.from_params(CRFParams(filter_size=3), 3, learn=learn)
    path = tmp_path / "learned.json"
    module.save(path)
    return path


@pytest.mark.parametrize(
    "learn, expected",
    [
        ("compat,C", (*DEFAULT_LEARN, "C")),
        ("T", (*DEFAULT_LEARN, "T")),
        ("compat,scales,weight,C,T", (*DEFAULT_LEARN, "C", "T")),
        ("scales", DEFAULT_LEARN),
    ],
)
def test_load_by_default_keeps_learning_the_files_matrices(tmp_path, learn, expected):
    loaded = ConvCRF.load(_saved_with_matrices(tmp_path, learn), num_classes=3)
    assert loaded.learn == expected
    for matrix in (loaded.compat_transform, loaded.feature_transform):
        assert matrix is None or matrix.requires_grad
    assert loaded.log_col_schan.requires_grad and loaded.weight.requires_grad


def test_load_with_explicit_learn_freezes_the_files_matrices(tmp_path):
    path = _saved_with_matrices(tmp_path, "C,T")
    loaded = ConvCRF.load(path, learn="compat")
    assert loaded.learn == ("compat",)
    assert not loaded.compat_transform.requires_grad
    assert not loaded.feature_transform.requires_grad
    learned = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert learned == {"pos_compat", "col_compat"}
    data = json.loads(path.read_text())
    assert ConvCRF.from_dict(data, learn="T").learn == ("T",)
    assert ConvCRF.from_dict(data).learn == (*DEFAULT_LEARN, "C", "T")


@pytest.mark.parametrize("learn", ["compat", "compat,C,T"])
@pytest.mark.parametrize(
    "image_dtype, logits_dtype",
    [
        (torch.float64, torch.float32),
        (torch.uint8, torch.float32),
        (torch.int64, torch.float32),
        (torch.float32, torch.float64),
        (torch.uint8, torch.float64),
    ],
)
def test_forward_converts_the_image_to_the_logits_dtype(learn, image_dtype, logits_dtype):
    module = ConvCRF.from_params(CRFParams(filter_size=3, blur=2, iterations=2), 3, learn=learn)
    if logits_dtype == torch.float64:
        module = module.double()
    image, logits = _case(6, 6, 7, 3, 3)
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].round().to(image_dtype)
    logits_t = torch.from_numpy(logits)[None].to(logits_dtype)
    with torch.no_grad():
        scores = module(image_t, logits_t)
        expected = module(image_t.to(logits_dtype), logits_t)
    assert scores.dtype == logits_dtype
    assert torch.equal(scores, expected)


@pytest.mark.parametrize("logits_dtype", [torch.float64, torch.bfloat16])
def test_the_transforms_follow_the_logits_dtype_as_the_scalars_do(logits_dtype):
    torch.manual_seed(1)
    module = ConvCRF.from_params(CRFParams(filter_size=3, blur=2, iterations=2), 3, learn="C,T")
    with torch.no_grad():
        module.compat_transform.normal_(0, 0.3)
        module.feature_transform.add_(torch.randn(3, 3) * 0.3)
    image, logits = _case(7, 6, 7, 3, 3)
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None]
    logits_t = torch.from_numpy(logits)[None].to(logits_dtype)
    scores = module(image_t, logits_t)
    scores.float().square().sum().backward()
    assert scores.dtype == logits_dtype
    assert module.compat_transform.grad.dtype == torch.float32
    assert module.feature_transform.grad.abs().sum() > 0
    with torch.no_grad():
        expected = module.double()(image_t, logits_t.double())
    tolerance = 1e-5 if logits_dtype == torch.float64 else 0.1 * expected.abs().max().item()
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=tolerance)
