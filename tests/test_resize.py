"""Unaries of another size than the image (``resize="bilinear"``): the resized logits against a
float64 reference and PyTorch, label maps by nearest neighbour, the layout by aspect ratio."""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch
from PIL import Image

from convcrf_cli.errors import BadInputError
from convcrf_cli.resize import aspect_matches, resize_labels, resize_logits
from convcrf_cli.unary import count_classes, load_unary, read_unary

IMAGE_HW = (30, 44)
C = 4


def _probs(shape: tuple[int, int], seed: int = 0, classes: int = C) -> np.ndarray:
    """``[C,h,w] float32`` probabilities, some below the 1e-6 floor of the conversion."""
    scores = np.random.default_rng(seed).normal(0, 6, (classes, *shape))
    e = np.exp(scores - scores.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def _save(tmp_path, array: np.ndarray, name: str = "u.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def _error(source, hw=IMAGE_HW, **kwargs) -> str:
    with pytest.raises(BadInputError) as caught:
        read_unary(source, hw, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 2
    assert message.startswith(f"{source}: ")
    return message


def _stored_as(kind: str, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``probs`` stored as ``kind`` and the logits the tool's conversion gives, in float64."""
    p = probs.astype(np.float64)
    if kind == "prob":
        return probs, np.log(np.maximum(p, 1e-6))
    logits = np.log(p) - 3.0
    if kind == "logit":
        return logits.astype(np.float32), logits.astype(np.float32).astype(np.float64)
    energy = (-logits).astype(np.float32)  # energies of unnormalised probabilities
    return energy, -energy.astype(np.float64)


@pytest.mark.parametrize("kind", ["prob", "logit", "energy"])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize(
    ("source_hw", "image_hw"),
    [
        ((9, 13), IMAGE_HW),  # up by 3.33 and 3.38
        ((30, 41), (13, 17)),  # down by 2.31 and 2.41
        ((30, 43), IMAGE_HW),  # one axis only, by 1.02
    ],
)
def test_resized_logits_equal_the_float64_bilinear_reference(
    tmp_path, kind, layout, source_hw, image_hw
):
    stored, logits = _stored_as(kind, _probs(source_hw))
    array = stored if layout == "CHW" else np.ascontiguousarray(stored.transpose(1, 2, 0))
    path = _save(tmp_path, array)
    read = read_unary(path, image_hw, kind, resize="bilinear")
    assert read.layout == layout and read.kind == kind  # told apart by aspect ratio
    assert read.logits.shape == (C, *image_hw) and read.logits.dtype == np.float32
    assert read.logits.flags.c_contiguous
    expected = reference.resize_bilinear(logits, *image_hw)
    np.testing.assert_allclose(read.logits, expected, rtol=1e-6, atol=2e-5)
    assert read.notes == (
        f"{path}: unary resized from {source_hw[0]}×{source_hw[1]} to "
        f"{image_hw[0]}×{image_hw[1]} (bilinear, on the logits)",
    )


def test_a_stretch_to_another_aspect_ratio_takes_the_named_layout(tmp_path):
    # a fixed 16×16 network input stretched back to 30×44: its layout must be named
    probs = _probs((16, 16))
    path = _save(tmp_path, probs.transpose(1, 2, 0))
    message = _error(path, resize="bilinear")
    assert "neither reading has its aspect ratio" in message
    assert "--layout CHW or --layout HWC" in message
    read = read_unary(path, IMAGE_HW, resize="bilinear", layout="HWC")
    expected = reference.resize_bilinear(np.log(np.maximum(probs, 1e-6)), *IMAGE_HW)
    np.testing.assert_allclose(read.logits, expected, rtol=1e-6, atol=2e-5)


def test_resize_logits_agrees_with_torch_interpolate():
    logits = np.random.default_rng(1).normal(0, 4, (3, 11, 17)).astype(np.float32)
    for size in [(30, 44), (5, 7), (64, 9), (11, 17)]:
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(logits)[None], size=size, mode="bilinear", align_corners=False
        )[0].numpy()
        resized = resize_logits(logits, size)
        assert resized.dtype == np.float32 and not np.shares_memory(resized, logits)
        np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-4)


def test_a_single_channel_becomes_two_classes_before_it_is_resized(tmp_path):
    foreground = _probs((9, 13), classes=2)[1:]
    path = _save(tmp_path, foreground)
    read = read_unary(path, IMAGE_HW, resize="bilinear")
    p = foreground[0].astype(np.float64)
    logits = np.log(np.maximum(np.stack([1 - p, p]), 1e-6))
    np.testing.assert_allclose(
        read.logits, reference.resize_bilinear(logits, *IMAGE_HW), rtol=1e-6, atol=2e-5
    )


def test_nearest_neighbour_label_maps_by_hand():
    small = np.array([[0, 1, 2], [3, 4, 5]])
    # rows ⌊(i + ½)·2/5⌋ = 0 0 1 1 1, columns ⌊(j + ½)·3/4⌋ = 0 1 1 2
    expected = np.array(
        [[0, 1, 1, 2], [0, 1, 1, 2], [3, 4, 4, 5], [3, 4, 4, 5], [3, 4, 4, 5]],
    )
    np.testing.assert_array_equal(resize_labels(small, (5, 4)), expected)
    # rows ⌊(i + ½)·5/2⌋ = 1 3, columns ⌊(j + ½)·4/3⌋ = 0 2 3 (1.5·4/3 = 2 exactly)
    large = np.arange(20).reshape(5, 4)
    np.testing.assert_array_equal(resize_labels(large, (2, 3)), [[4, 6, 7], [12, 14, 15]])


def test_a_label_image_is_resized_by_nearest_neighbour_then_converted(tmp_path):
    small = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    expected = np.array(
        [[0, 1, 1, 2], [0, 1, 1, 2], [3, 255, 255, 1], [3, 255, 255, 1], [3, 255, 255, 1]],
        np.uint8,
    )
    Image.fromarray(expected).save(tmp_path / "large.png")
    options = {"ignore_label": 255, "label_confidence": 0.8}
    read = read_unary(tmp_path / "small.png", (5, 4), resize="bilinear", **options)
    direct = read_unary(tmp_path / "large.png", (5, 4), **options)
    assert read.kind == "labels" and read.num_classes == 4
    np.testing.assert_array_equal(read.logits, direct.logits)
    assert read.notes == (
        f"{tmp_path / 'small.png'}: unary resized from 2×3 to 5×4 (nearest neighbour, on the "
        "labels)",
    )
    assert "pixels uniform" in read.reason and read.reason == direct.reason


def test_a_label_map_counts_the_classes_it_stores_even_those_resizing_drops(tmp_path):
    labels = np.zeros((5, 4), np.uint8)
    labels[1:] = 1
    labels[0, 0] = 6  # row 0 is not sampled for 2×3: still 7 classes
    Image.fromarray(labels).save(tmp_path / "l.png")
    source = load_unary(tmp_path / "l.png")
    assert count_classes(source, (2, 3), resize="bilinear") == 7
    read = read_unary(tmp_path / "l.png", (2, 3), resize="bilinear")
    assert read.num_classes == 7 and (read.logits.argmax(0) == 1).all()


def test_aspect_rule_allows_a_pixel_of_rounding_per_side():
    image = (375, 500)
    for size in [(47, 63), (47, 62), (48, 63), (24, 32), (12, 16), (94, 125), (750, 1000)]:
        assert aspect_matches(size, image), size
    for size in [(65, 65), (63, 47), (45, 63), (47, 66), (0, 0), (0, 5)]:
        assert not aspect_matches(size, image), size
    # the bound itself: |h·W − w·H| = H + W = 21, then 22
    assert aspect_matches((11, 10), (10, 11)) and not aspect_matches((12, 11), (10, 11))


def test_a_reading_of_the_image_size_wins_over_one_of_its_aspect_ratio(tmp_path):
    # CHW reading 30×44 is the image's size; the HWC reading 20×30 has its aspect ratio
    probs = _probs(IMAGE_HW, classes=20)
    assert aspect_matches(probs.shape[:2], IMAGE_HW)
    read = read_unary(_save(tmp_path, probs), IMAGE_HW, resize="bilinear")
    assert read.layout == "CHW" and read.notes == ()
    np.testing.assert_array_equal(read.logits, read_unary(tmp_path / "u.npy", IMAGE_HW).logits)


def test_both_readings_of_the_aspect_ratio_need_the_layout(tmp_path):
    probs = _probs((7, 9))  # CHW 7×9 and HWC 4×7 both have 24×32's aspect ratio
    path = _save(tmp_path, probs)
    message = _error(path, (24, 32), resize="bilinear")
    assert message == (
        f"{path}: unary shape (4, 7, 9) differs from the 24×32 image and both readings have its "
        "aspect ratio (CHW 7×9, HWC 4×7): name the layout (--layout CHW or --layout HWC) to "
        "resize it"
    )
    assert read_unary(path, (24, 32), resize="bilinear", layout="CHW").num_classes == C
    assert read_unary(path, (24, 32), resize="bilinear", layout="HWC").num_classes == 9


def test_without_resizing_another_size_is_refused_with_a_hint(tmp_path):
    path = _save(tmp_path, _probs((9, 13)))
    hint = "--resize-unary bilinear resizes a unary of another size to the image's"
    assert _error(path).endswith(f"or (30, 44, C); {hint}")
    assert _error(path, layout="CHW").endswith("is not CHW (C, 30, 44) for the 30×44 image")
    Image.fromarray(np.zeros((9, 13), np.uint8)).save(tmp_path / "l.png")
    assert _error(tmp_path / "l.png", num_classes=2) == (
        f"{tmp_path / 'l.png'}: label map is 9×13 but the image is 30×44; {hint}"
    )


def test_an_empty_reading_cannot_be_resized_and_an_unknown_mode_is_named(tmp_path):
    path = _save(tmp_path, np.zeros((C, 0, 5), np.float32))
    assert "no pixels to resize as CHW" in _error(path, resize="bilinear", layout="CHW")
    assert "neither reading" in _error(path, resize="bilinear")
    assert "unknown resize 'bicubic'" in _error(_save(tmp_path, _probs(IMAGE_HW)), resize="bicubic")
