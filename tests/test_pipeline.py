"""Pipeline helpers: the class argmax used for every label map, and batched refinement."""

from __future__ import annotations

import numpy as np
import pytest

from convcrf_cli.pipeline import class_argmax


@pytest.mark.parametrize("classes", [1, 2, 21, 300])
def test_class_argmax_equals_numpy_argmax_with_first_index_on_ties(classes):
    rng = np.random.default_rng(classes)
    scores = rng.integers(-3, 3, (classes, 7, 9)).astype(np.float32)  # many ties
    labels = class_argmax(scores)
    assert labels.dtype == np.int32 and labels.shape == (7, 9)
    np.testing.assert_array_equal(labels, scores.argmax(axis=0))
    hwc_view = np.moveaxis(rng.normal(size=(7, 9, classes)).astype(np.float32), -1, 0)
    np.testing.assert_array_equal(class_argmax(hwc_view), hwc_view.argmax(axis=0))
