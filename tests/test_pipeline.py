"""Pipeline helpers: the class argmax used for every label map, and batched refinement."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from convcrf_cli.errors import BadInputError
from convcrf_cli.pipeline import check_pooled_range, class_argmax


@pytest.mark.parametrize("classes", [1, 2, 21, 300])
def test_class_argmax_equals_numpy_argmax_with_first_index_on_ties(classes):
    rng = np.random.default_rng(classes)
    scores = rng.integers(-3, 3, (classes, 7, 9)).astype(np.float32)  # many ties
    labels = class_argmax(scores)
    assert labels.dtype == np.int32 and labels.shape == (7, 9)
    np.testing.assert_array_equal(labels, scores.argmax(axis=0))
    hwc_view = np.moveaxis(rng.normal(size=(7, 9, classes)).astype(np.float32), -1, 0)
    np.testing.assert_array_equal(class_argmax(hwc_view), hwc_view.argmax(axis=0))


_MEMORY_UNDER_LIMIT = """
import resource
from convcrf_cli.pipeline import available_memory_bytes
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (size + (300 << 20), hard))
print(available_memory_bytes() >> 20)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status")
def test_available_memory_counts_the_address_space_limit():
    # ulimit -v: what the limit leaves the process, not what the machine has free
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_UNDER_LIMIT], capture_output=True, text=True, timeout=120
    )
    assert 290 <= int(done.stdout) <= 300, done.stderr


def test_the_pooled_range_of_an_image_of_ordinary_values_is_checked_without_a_copy():
    # np.abs(pixels, dtype=float64) took a float64 copy of every float image: 8 bytes a value
    # beside the image's 4, before the CRF's memory check had counted it.
    pixels = np.full((500, 500, 3), -255.0, np.float32)  # 3 MB
    tracemalloc.start()
    try:
        check_pooled_range("a.tif", pixels, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000


def test_the_pooled_range_at_any_offset_sums_every_window_of_the_blur():
    # Rows 5 and 6 lie in two cells of the 12-row grid of blur 3 (cells start at 0, 3, 6, 9),
    # but in one cell of a crop whose grid has a cell at rows 5 to 7, as fit's random crops may.
    pixels = np.ones((12, 12, 1), np.float32)
    pixels[5:7, 4] = 2e38
    check_pooled_range("a.tif", pixels, 3)  # refine's grid: no cell overflows
    with pytest.raises(BadInputError, match=r"a cell of --blur 3 reach 4e\+38, beyond float32"):
        check_pooled_range("a.tif", pixels, 3, any_offset=True)
    pixels[6, 4] = 1.0
    check_pooled_range("a.tif", pixels, 3, any_offset=True)
    with pytest.raises(BadInputError, match="reach 6e"):  # a blur past the image: one cell
        check_pooled_range("a.tif", np.full((2, 3, 1), -1e38, np.float32), 10**6)
