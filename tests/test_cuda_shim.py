"""The unmodified cuda/*.cu kernels, run on the CPU through tests/cuda_shim, against the float64
reference: the launch logic of the CUDA backend (``run_plan``) drives them exactly as on a GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import reference
from conftest import SHIM_CLASS_BLOCK, shim_launcher
from cuda_shim.cases import SMALL

from convcrf_cli.backends.cuda_plan import MAX_CLASS_BLOCK, LaunchConfig, MeanFieldPlan, run_plan
from convcrf_cli.backends.cuda_plan import MESSAGE_KERNELS as KERNELS
from convcrf_cli.params import CRFParams

MESSAGE_KERNELS = {name: dataclasses.replace(SMALL, message_kernel=name) for name in KERNELS}


def refine_with_shim(shim, image, logits, params, config=SMALL):
    """image [N,H,W,F], logits [N,C,H,W] -> (scores [N,C,H,W] float32, plan)."""
    n, c, height, width = logits.shape
    image_nfhw = np.ascontiguousarray(image.transpose(0, 3, 1, 2), dtype=np.float32)
    plan = MeanFieldPlan.create(
        image_nfhw.shape, logits.shape, params, config, class_block=shim.class_block
    )
    scores = np.full((n, c, height, width), np.nan, np.float32)

    def poisoned(shape, dtype):
        return np.full(shape, np.nan, dtype)

    run_plan(plan, image_nfhw, np.ascontiguousarray(logits), scores, shim, poisoned)
    return scores, plan


def random_inputs(seed, n, height, width, classes, features):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (n, height, width, features)).astype(np.float32)
    # Smooth blobs so the colour kernel matters, plus noise.
    image[..., : features // 2 + 1] = np.where(
        (np.arange(width) > width // 2)[None, None, :, None], 200.0, 40.0
    ) + rng.normal(0, 10, (n, height, width, features // 2 + 1))
    logits = rng.normal(0, 2, (n, classes, height, width)).astype(np.float32)
    return image, logits


def assert_matches_reference(scores, image, logits, params):
    assert np.isfinite(scores).all()
    expected = np.stack([reference.refine(image[i], logits[i], params) for i in range(len(image))])
    error = np.abs(scores - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"max relative error {error:.2e}"


# (height, width, classes, features, filter_size, blur, init, batch, iterations)
CASES = [
    (19, 23, 21, 3, 5, 4, "log", 2, 5),
    (17, 13, 2, 1, 3, 1, "softmax", 1, 5),
    (24, 21, 21, 4, 11, 3, "softmax", 1, 3),
    (20, 22, 2, 3, 7, 2, "log", 2, 5),
    (13, 18, 21, 1, 7, 1, "log", 1, 2),
    (23, 16, 2, 4, 3, 4, "softmax", 1, 5),
    (18, 15, 21, 3, 11, 2, "log", 1, 1),
    (9, 11, 2, 3, 5, 4, "softmax", 3, 4),
    # three tiled blocks of 32 cells in x, the last with 6 of them; two rows of blocks
    (11, 70, 21, 3, 5, 1, "log", 1, 2),
    (12, 75, 2, 2, 9, 1, "softmax", 2, 2),
]


@pytest.mark.parametrize("message_kernel", MESSAGE_KERNELS)
@pytest.mark.parametrize(
    ("height", "width", "classes", "features", "k", "blur", "init", "n", "its"), CASES
)
def test_shim_matches_reference(
    shim, message_kernel, height, width, classes, features, k, blur, init, n, its
):
    params = CRFParams(filter_size=k, blur=blur, init=init, iterations=its)
    image, logits = random_inputs(height * width + k, n, height, width, classes, features)
    scores, plan = refine_with_shim(shim, image, logits, params, MESSAGE_KERNELS[message_kernel])
    assert plan.message_kernel == message_kernel
    assert_matches_reference(scores, image, logits, params)


@pytest.mark.parametrize(("height", "width", "k"), [(11, 70, 5), (19, 23, 13), (8, 9, 3)])
def test_message_kernels_agree(shim, height, width, k):
    """The tiled kernel adds the same products in the same order as the per-cell one: equal
    scores, bit for bit; the split kernel adds each window row's sum: equal to rounding."""
    params = CRFParams(filter_size=k, blur=1, iterations=3)
    image, logits = random_inputs(k, 1, height, width, 21, 3)
    scores = {}
    for name, config in MESSAGE_KERNELS.items():
        scores[name], plan = refine_with_shim(shim, image, logits, params, config)
        assert plan.message_kernel == name
    np.testing.assert_array_equal(scores["tiled"], scores["per-cell"])
    np.testing.assert_allclose(scores["split"], scores["per-cell"], rtol=0, atol=1e-5)


def test_split_rows_shared_by_fewer_threads_than_the_window(shim):
    """8x8 cells with k=17 allow 16 threads per cell (1024 per block): one of them sums two
    window rows."""
    config = dataclasses.replace(MESSAGE_KERNELS["split"], split_cells=(8, 8))
    params = CRFParams(filter_size=17, blur=1, iterations=1)
    image, logits = random_inputs(17, 1, 12, 10, 2, 1)
    scores, plan = refine_with_shim(shim, image, logits, params, config)
    assert plan.message_launch(None, None, None)[:3] == (
        "convcrf_message_split",
        (2, 2, 1),
        (8, 8, 16),
    )
    assert_matches_reference(scores, image, logits, params)


FUSED = dataclasses.replace(SMALL, fuse_message=True)


@pytest.mark.parametrize(
    ("config", "blur"), [(kernel, blur) for kernel in KERNELS for blur in (1, 2)] + [("fused", 2)]
)
def test_sixteen_bit_image_at_high_values_matches_reference(shim, config, blur):
    """A smooth 16-bit image near 60000: scaled before their differences, its features
    (I / col_schan ~ 4600) lose ~3e-4 in float32 and put the scores 4e-4 off the reference; the
    kernels scale the differences of the raw pooled values."""
    rng = np.random.default_rng(9)
    image = np.clip(60000 + rng.normal(0, 13, (1, 24, 24, 1)), 0, 65535).astype(np.uint16)
    logits = rng.normal(0, 2, (1, 3, 24, 24)).astype(np.float32)
    params = CRFParams(filter_size=5, blur=blur, init="log")
    launch = FUSED if config == "fused" else MESSAGE_KERNELS[config]
    scores, plan = refine_with_shim(shim, image.astype(np.float32), logits, params, launch)
    assert plan.fused == (config == "fused")
    assert_matches_reference(scores, image, logits, params)


@pytest.mark.parametrize("field", ["pos_sdims", "col_schan"])
@pytest.mark.parametrize("config", [*KERNELS, "fused"])
def test_tiny_feature_scales_give_finite_scores(shim, field, config):
    """19 / 2e-38 overflows float32: features scaled before their differences gave inf - inf
    and NaN scores; the reference (float64) has weight 0 off the centre, as the scaled
    differences give."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (1, 20, 20, 3)).astype(np.float32)
    logits = rng.normal(0, 1, (1, 3, 20, 20)).astype(np.float32)
    params = CRFParams(filter_size=3, blur=2, **{field: 2e-38})
    launch = FUSED if config == "fused" else MESSAGE_KERNELS[config]
    scores, _ = refine_with_shim(shim, image, logits, params, launch)
    assert_matches_reference(scores, image, logits, params)


@pytest.mark.parametrize(
    ("height", "width", "classes", "features", "k", "blur", "init", "n", "its"),
    [case for case in CASES if case[5] > 1] + [(30, 41, 21, 3, 13, 3, "log", 2, 3)],
)
def test_fused_iterations_match_reference(
    shim, height, width, classes, features, k, blur, init, n, its
):
    """Message and step in one launch per iteration (convcrf_step_fused) at blur > 1."""
    params = CRFParams(filter_size=k, blur=blur, init=init, iterations=its)
    image, logits = random_inputs(height * width + k, n, height, width, classes, features)
    before = len(shim.launches)
    scores, plan = refine_with_shim(shim, image, logits, params, FUSED)
    names = [launch[0] for launch in shim.launches[before:]]
    assert plan.fused
    assert names == ["convcrf_pool_features", "convcrf_init"] + ["convcrf_step_fused"] * its
    assert_matches_reference(scores, image, logits, params)


def test_fused_iterations_with_two_row_groups(shim):
    """Shared memory for two row groups only: two threads share the 7 window rows of a cell.
    4x4 cells per block at blur 2: a window of 6x6 cells, 12x12 staged with the halo, 21
    classes padded to 24 (chunks of 4): 21*36 + 29*144 + 2*24*36 = 6660 floats."""
    config = dataclasses.replace(FUSED, shared_memory=4 * 6660)
    params = CRFParams(filter_size=7, blur=2, iterations=3)
    image, logits = random_inputs(9, 1, 21, 26, 21, 3)
    scores, plan = refine_with_shim(shim, image, logits, params, config)
    assert plan.pool_tile == (4, 4)
    assert plan.fused_layout == (2, 21)
    assert plan.fused_shared == config.shared_memory
    assert_matches_reference(scores, image, logits, params)


def test_fusion_needs_blur_and_shared_memory():
    params = CRFParams(filter_size=7, blur=1)
    assert not MeanFieldPlan.create((1, 3, 40, 40), (1, 21, 40, 40), params, FUSED, 4).fused
    tight = dataclasses.replace(FUSED, shared_memory=4 * 2000)
    params = CRFParams(filter_size=7, blur=2)
    assert not MeanFieldPlan.create((1, 3, 40, 40), (1, 21, 40, 40), params, tight, 4).fused
    assert MeanFieldPlan.create((1, 3, 40, 40), (1, 21, 40, 40), params, FUSED, 4).fused


def test_many_image_channels_take_the_per_cell_message(shim):
    """Five image channels (7 features) exceed the tiled kernel's registers."""
    params = CRFParams(filter_size=5, blur=2, iterations=2)
    image, logits = random_inputs(7, 1, 14, 17, 2, 5)
    scores, plan = refine_with_shim(shim, image, logits, params, SMALL)
    assert plan.message_kernel == "per-cell"
    assert_matches_reference(scores, image, logits, params)


@pytest.mark.parametrize("blur", [2, 1])
def test_pooling_in_several_class_chunks(shim, blur):
    """A small shared-memory budget splits the init/step pooling into rounds of classes (at
    blur 1: the scores are computed twice instead of kept in shared memory)."""
    params = CRFParams(filter_size=3, blur=blur, init="softmax", iterations=3)
    config = LaunchConfig(
        cell_block=(8, 8),
        pixel_block=(8, 8),
        pool_threads=64,
        pool_box_width=8,
        pool_box_pixels=64,
        shared_memory=4096,
    )
    image, logits = random_inputs(3, 1, 21, 19, 21, 3)
    scores, plan = refine_with_shim(shim, image, logits, params, config)
    assert plan.chunk_classes < 21
    assert plan.pool_shared <= 4096
    assert_matches_reference(scores, image, logits, params)


def test_gpu_launch_configuration(shim):
    """The block shapes the GPU uses (16x16 cells, 256-thread pooling blocks) on the CPU."""
    params = CRFParams(filter_size=7, blur=4, iterations=2)
    image, logits = random_inputs(5, 2, 26, 37, 2, 3)
    scores, plan = refine_with_shim(shim, image, logits, params, LaunchConfig())
    assert plan.pool_tile == (2, 8)
    assert_matches_reference(scores, image, logits, params)


@pytest.fixture(scope="module", params=[11, MAX_CLASS_BLOCK])
def gpu_class_block_shim(request):
    """The shim compiled with a class block of the GPU: 11 (21 classes in two chunks, the
    default) or the largest, where the kernels hold the most values in registers."""
    return shim_launcher(request.param)


@pytest.mark.parametrize(
    ("message_kernel", "fuse", "blur"),
    [("per-cell", False, 2), ("split", False, 1), ("tiled", False, 1), ("per-cell", True, 3)],
)
def test_gpu_class_blocks_and_block_shapes(gpu_class_block_shim, message_kernel, fuse, blur):
    """Each message kernel and the fused iterations at the GPU's class blocks and block shapes."""
    shim = gpu_class_block_shim
    config = dataclasses.replace(LaunchConfig(), message_kernel=message_kernel, fuse_message=fuse)
    params = CRFParams(filter_size=7, blur=blur, iterations=2)
    image, logits = random_inputs(blur, 1, 21, 70, 21, 3)
    scores, plan = refine_with_shim(shim, image, logits, params, config)
    assert (plan.message_kernel, plan.fused, plan.num_chunks) == (message_kernel, fuse, 2)
    assert_matches_reference(scores, image, logits, params)


@pytest.fixture(scope="module", params=[4, 8])
def load_group_shim(request):
    """The shim compiled with loads in groups of 4 or 8 (classes' scores, staged values)."""
    return shim_launcher(SHIM_CLASS_BLOCK, request.param)


@pytest.mark.parametrize("message_kernel", MESSAGE_KERNELS)
def test_load_groups_stage_the_same_message_tiles(load_group_shim, shim, message_kernel):
    """Staging the message tiles in groups of loads moves the same values: the same message,
    bit for bit (a partial last group, a halo outside the grid, 21 classes in chunks of 4)."""
    params = CRFParams(filter_size=7, blur=1)
    rng = np.random.default_rng(3)
    n, classes, h, w = 2, 21, 13, 19
    feat = rng.normal(0, 2, (n, 5, h, w)).astype(np.float32)
    pooled = rng.random((n, classes, h, w), dtype=np.float32)
    plan = MeanFieldPlan.create(
        (n, 3, h, w), (n, classes, h, w), params, MESSAGE_KERNELS[message_kernel], class_block=4
    )
    assert plan.message_kernel == message_kernel
    messages = []
    for launch in (shim, load_group_shim):
        message = np.full(pooled.shape, np.nan, np.float32)
        launch(*plan.message_launch(feat, pooled, message))
        messages.append(message)
    assert np.isfinite(messages[0]).all()
    np.testing.assert_array_equal(messages[1], messages[0])


CHUNKED = dataclasses.replace(
    SMALL, shared_memory=4096, cell_block=(4, 4), message_kernel="per-cell"
)
"""Too little shared memory to keep each pixel's scores: they are computed again per round."""


@pytest.mark.parametrize(
    ("config", "fuse", "blur", "classes", "init"),
    [
        (SMALL, False, 3, 21, "softmax"),  # z kept in shared memory; 21 = 8 + 8 + 5
        (SMALL, True, 3, 21, "log"),  # fused iterations, their final scores
        (CHUNKED, False, 2, 21, "softmax"),  # rounds of classes, groups within each round
        (SMALL, False, 1, 21, "log"),  # blur 1, z kept
        (CHUNKED, False, 1, 21, "softmax"),  # blur 1, z computed twice
        (SMALL, False, 4, 2, "softmax"),  # fewer classes than a group
    ],
)
def test_load_groups_match_reference_and_one_class_at_a_time(
    load_group_shim, shim, config, fuse, blur, classes, init
):
    """Loading several classes' scores before using them changes only the order of the
    softmax sums: the reference's numbers, and group 1's to rounding."""
    params = CRFParams(filter_size=5, blur=blur, init=init, iterations=3)
    image, logits = random_inputs(classes + blur, 2, 17, 22, classes, 3)
    config = dataclasses.replace(config, fuse_message=fuse)
    scores, plan = refine_with_shim(load_group_shim, image, logits, params, config)
    assert plan.fused == fuse
    if config is CHUNKED:
        assert 0 <= plan.chunk_classes < classes
    assert_matches_reference(scores, image, logits, params)
    one_at_a_time, _ = refine_with_shim(shim, image, logits, params, config)
    np.testing.assert_allclose(scores, one_at_a_time, rtol=0, atol=1e-5)


@pytest.mark.parametrize("message_kernel", MESSAGE_KERNELS)
def test_launch_sequence(shim, message_kernel):
    """One launch of each kernel per batch (not per image), one message per iteration."""
    params = CRFParams(filter_size=3, blur=2, iterations=3)
    image, logits = random_inputs(1, 2, 10, 12, 2, 1)
    before = len(shim.launches)
    refine_with_shim(shim, image, logits, params, MESSAGE_KERNELS[message_kernel])
    names = [launch[0] for launch in shim.launches[before:]]
    message = {"per-cell": "convcrf_message"}.get(
        message_kernel, f"convcrf_message_{message_kernel}"
    )
    assert names == [
        "convcrf_pool_features",
        "convcrf_init",
        message,
        "convcrf_step",
        message,
        "convcrf_step",
        message,
        "convcrf_final",
    ]
    assert all(launch[1][2] == 2 for launch in shim.launches[before:] if launch[0] != message)
