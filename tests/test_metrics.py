"""Segmentation metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from convcrf_cli.metrics import confusion_matrix, iou_per_class

# labels      pred
# 0 0 1       0 1 1
# 1 2 2       1 2 0
LABELS = np.array([[0, 0, 1], [1, 2, 2]])
PRED = np.array([[0, 1, 1], [1, 2, 0]])


def test_confusion_matrix_hand_computed():
    expected = np.array(
        [
            [1, 1, 0],  # true 0: one right, one predicted 1
            [0, 2, 0],  # true 1: both right
            [1, 0, 1],  # true 2: one right, one predicted 0
        ]
    )
    np.testing.assert_array_equal(confusion_matrix(PRED, LABELS, 3), expected)


def test_iou_hand_computed():
    # class 0: inter 1, union 2 + 2 - 1 = 3; class 1: inter 2, union 2 + 3 - 2 = 3;
    # class 2: inter 1, union 2 + 1 - 1 = 2.
    np.testing.assert_allclose(
        iou_per_class(confusion_matrix(PRED, LABELS, 3)), [1 / 3, 2 / 3, 1 / 2]
    )


def test_ignore_label_is_left_out():
    labels = LABELS.copy()
    labels[1, 2] = 255  # the pixel labelled 2 and predicted 0
    np.testing.assert_array_equal(
        confusion_matrix(PRED, labels, 3), [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    )
    np.testing.assert_allclose(iou_per_class(confusion_matrix(PRED, labels, 3)), [1 / 2, 2 / 3, 1])


def test_absent_classes_are_nan():
    labels = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    # class 0: 2 / 3, class 1: 1 / 2; classes 2..4 appear nowhere.
    iou = iou_per_class(confusion_matrix(pred, labels, 5))
    np.testing.assert_allclose(iou[:2], [2 / 3, 1 / 2])
    assert np.isnan(iou[2:]).all()


def test_perfect_prediction_and_batched_shapes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 5, 6))
    confusion = confusion_matrix(labels, labels, 4)
    assert confusion.sum() == labels.size
    np.testing.assert_array_equal(confusion, np.diag(np.bincount(labels.ravel(), minlength=4)))
    np.testing.assert_array_equal(iou_per_class(confusion), 1.0)


def test_errors():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED, LABELS[:1], 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion_matrix(PRED, LABELS, 2)
    assert not confusion_matrix(PRED, np.full_like(LABELS, 255), 3).any()


@pytest.mark.parametrize(
    ("pred", "labels", "message"),
    [
        ([0, -1, 2], [0, 1, 2], r"prediction values must lie in \[0, 3\), got -1"),
        ([0, 1, 2], [0, -2, 2], r"label values must lie in \[0, 3\), got -2"),
        ([0, 1, 2], [0, 1, 5], r"label values must lie in \[0, 3\), got 5"),
    ],
)
def test_out_of_range_values_are_named(pred, labels, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(np.array(pred), np.array(labels), 3)


@pytest.mark.parametrize(
    ("pred", "labels", "message"),
    [
        ([0.7, 1.9], [0, 1], "predictions must be integer class ids, got dtype float64"),
        ([0, 1], [0.5, 1.0], "labels must be integer class ids, got dtype float64"),
        ([True, False], [1, 0], "predictions must be integer class ids, got dtype bool"),
    ],
)
def test_non_integer_class_maps_are_refused(pred, labels, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        confusion_matrix(np.array(pred), np.array(labels), 2)
