"""Output writing: palette, label maps, probabilities, overlays, pre-checks and the staging
that writes the outputs of one item all or none."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convcrf_cli import atomic, outputs
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.outputs import (
    OutputSpec,
    check_class_count,
    check_outputs,
    check_overlay_size,
    write_labels,
    write_outputs,
    write_overlay,
    write_probabilities,
)
from convcrf_cli.palette import palette_bytes, voc_palette

H, W = 24, 32


def test_voc_palette_known_entries_and_distinct():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    expected = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        4: (0, 0, 128),
        7: (128, 128, 128),
        8: (64, 0, 0),
        15: (192, 128, 128),
        20: (0, 64, 128),
        255: (224, 224, 192),
    }
    for index, colour in expected.items():
        assert tuple(palette[index]) == colour
    assert len({tuple(c) for c in palette}) == 256
    assert palette_bytes() == palette.tobytes()


def test_palette_png_round_trip_preserves_indices(tmp_path):
    labels = np.arange(H * W).reshape(H, W) % 256
    write_labels(tmp_path / "l.png", labels)
    picture = Image.open(tmp_path / "l.png")
    assert picture.mode == "P"
    np.testing.assert_array_equal(np.asarray(picture), labels)
    assert bytes(picture.getpalette()[:768]) == palette_bytes()
    assert list(tmp_path.iterdir()) == [tmp_path / "l.png"]


def test_npy_labels_are_int32(tmp_path):
    labels = np.arange(H * W).reshape(H, W) % 300
    write_labels(tmp_path / "l.npy", labels)
    got = np.load(tmp_path / "l.npy")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, labels)


def test_png_labels_above_255_fail_without_a_file(tmp_path):
    with pytest.raises(BadInputError, match="do not fit a PNG"):
        write_labels(tmp_path / "l.png", np.full((H, W), 256))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["CHW", "HWC", "labels"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_probabilities_layout_and_dtype(tmp_path, layout, dtype):
    probs = np.random.default_rng(0).random((3, H, W)).astype(np.float32)
    write_probabilities(tmp_path / "p.npy", probs, layout, dtype)
    got = np.load(tmp_path / "p.npy")
    assert got.dtype == np.dtype(dtype)
    expected = probs.transpose(1, 2, 0) if layout == "HWC" else probs
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_overlay_blends_palette_colours(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    labels = np.arange(H * W).reshape(H, W) % 21
    write_overlay(tmp_path / "o0.png", image, labels, 0.0)
    write_overlay(tmp_path / "o1.png", image, labels, 1.0)
    write_overlay(tmp_path / "oh.png", image, labels, 0.5)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o0.png")), image)
    colours = voc_palette()[labels]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o1.png")), colours)
    half = np.asarray(Image.open(tmp_path / "oh.png")).astype(int)
    assert np.abs(half - (image.astype(int) + colours) / 2).max() <= 0.5


def test_overlay_of_grayscale_sixteen_bit_and_float_images(tmp_path):
    labels = np.zeros((H, W), int)
    wide = np.full((H, W, 1), 257 * 100, np.uint16)
    write_overlay(tmp_path / "w.png", wide, labels, 0.0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "w.png")), 100)
    ramp = np.linspace(-1, 1, H * W, dtype=np.float32).reshape(H, W, 1)
    write_overlay(tmp_path / "f.png", ramp, labels, 0.0)
    got = np.asarray(Image.open(tmp_path / "f.png"))
    assert got.min() == 0 and got.max() == 255 and got.shape == (H, W, 3)


def test_check_outputs_refuses_bad_formats_and_overwriting_inputs(tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(b"")
    cases = [
        (OutputSpec(labels=tmp_path / "l.jpg"), "must be .png, .npy or -"),
        (OutputSpec(labels="-", probs=tmp_path / "p.txt"), "written as .npy"),
        (OutputSpec(labels="-", overlay="-"), "only the label output"),
        (OutputSpec(labels="-", probs="-"), "only the label output"),
        (OutputSpec(labels="-", overlay=tmp_path / "o.xyz"), "unknown image format"),
        (OutputSpec(labels=image), "overwrite an input"),
        (OutputSpec(labels=tmp_path / "a.png", overlay=tmp_path / "a.png"), "two outputs"),
        (OutputSpec(labels=tmp_path), "must be .png"),
        (OutputSpec(labels="-", alpha=1.5), "alpha"),
    ]
    for spec, problem in cases:
        with pytest.raises(BadInputError, match=problem):
            check_outputs(spec, [image, tmp_path / "u.npy"])
    check_outputs(OutputSpec(labels="-", overlay=tmp_path / "o.jpg"), [image])


def test_more_than_256_classes_need_npy_labels_and_no_overlay(tmp_path):
    with pytest.raises(BadInputError, match="257 classes do not fit a PNG label map"):
        check_class_count(OutputSpec(labels=tmp_path / "l.png"), 257)
    with pytest.raises(BadInputError, match="257 classes do not fit a PNG label map"):
        check_class_count(OutputSpec(labels="-"), 257)
    with pytest.raises(BadInputError) as caught:
        check_class_count(OutputSpec(labels=tmp_path / "l.npy", overlay=tmp_path / "o.png"), 257)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'o.png'}: 257 classes do not fit an overlay")
    assert ".npy" not in message  # the labels are .npy already
    check_class_count(OutputSpec(labels=tmp_path / "l.npy"), 257)
    check_class_count(OutputSpec(labels=tmp_path / "l.png"), 256)


UNWRITABLE_OVERLAYS = (".xbm", ".xpm", ".msp", ".palm", ".blp", ".fits", ".h5", ".grib", ".bufr")


@pytest.mark.parametrize("suffix", UNWRITABLE_OVERLAYS)
def test_check_outputs_refuses_overlay_formats_pillow_cannot_write_in_rgb(tmp_path, suffix):
    with pytest.raises(BadInputError) as caught:
        check_outputs(OutputSpec(labels=tmp_path / "l.png", overlay=tmp_path / f"o{suffix}"), [])
    assert str(caught.value).startswith(f"{tmp_path / f'o{suffix}'}: ")
    assert "use .png, .jpg" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif", ".bmp", ".gif", ".ppm"])
def test_check_outputs_accepts_overlay_formats_pillow_writes(tmp_path, suffix):
    check_outputs(OutputSpec(labels=tmp_path / "l.png", overlay=tmp_path / f"o{suffix}"), [])


def _item(classes: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image ``[H,W,3] uint8``, scores ``[C,H,W] float32`` and their argmax labels."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(classes, H, W)).astype(np.float32)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return image, scores, scores.argmax(axis=0).astype(np.int32)


def test_write_outputs_writes_labels_probabilities_and_overlay(tmp_path):
    image, scores, labels = _item()
    spec = OutputSpec(
        labels=tmp_path / "l.png", probs=tmp_path / "p.npy", overlay=tmp_path / "o.png"
    )
    written = write_outputs(spec, image, scores, labels, "HWC")
    assert written == [str(tmp_path / name) for name in ("l.png", "p.npy", "o.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "o.png", "p.npy"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "l.png")), labels)
    probs = np.load(tmp_path / "p.npy")
    expected = np.exp(scores) / np.exp(scores).sum(axis=0)
    np.testing.assert_allclose(probs, expected.transpose(1, 2, 0), rtol=1e-5)


def test_a_failing_output_leaves_none_of_the_item_outputs(tmp_path, monkeypatch):
    image, scores, labels = _item()
    (tmp_path / "p.npy").write_bytes(b"old")

    def failing_overlay(path, *args, **kwargs):
        raise RuntimeFailure(f"{path}: cannot write: No space left on device")

    monkeypatch.setattr(outputs, "write_overlay", failing_overlay)
    spec = OutputSpec(
        labels=tmp_path / "l.png", probs=tmp_path / "p.npy", overlay=tmp_path / "o.png"
    )
    with pytest.raises(RuntimeFailure, match="o.png: cannot write"):
        write_outputs(spec, image, scores, labels, "CHW")
    # No new file, no temporary left, and the old file the failure would have replaced is kept.
    assert [p.name for p in tmp_path.iterdir()] == ["p.npy"]
    assert (tmp_path / "p.npy").read_bytes() == b"old"


def test_overlay_formats_that_cannot_hold_the_image_are_refused_before_the_crf(tmp_path):
    for suffix, size, problem in [
        (".webp", (1, 17000), "WEBP holds at most 16383 pixels a side, the image is 1×17000"),
        (".jpg", (70000, 2), "JPEG holds at most 65500 pixels a side"),
        (".gif", (2, 70000), "GIF holds at most 65535 pixels a side"),
    ]:
        spec = OutputSpec(labels=tmp_path / "l.png", overlay=tmp_path / f"o{suffix}")
        check_outputs(spec, [])
        with pytest.raises(BadInputError, match=problem):
            check_overlay_size(spec, size)
        check_overlay_size(spec, (1000, 1000))
    check_overlay_size(
        OutputSpec(labels=tmp_path / "l.png", overlay=tmp_path / "o.png"), (1, 70000)
    )
    for suffix in (".ico", ".icns"):
        spec = OutputSpec(labels=tmp_path / "l.png", overlay=tmp_path / f"o{suffix}")
        with pytest.raises(BadInputError, match="icons of fixed sizes, not the image"):
            check_outputs(spec, [])


def test_a_failing_rename_removes_the_outputs_already_renamed(tmp_path, monkeypatch):
    image, scores, labels = _item()
    real_replace = os.replace

    def replace(source, target):
        if str(target).endswith("o.png"):
            raise OSError(28, "No space left on device", source, None, target)
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)
    spec = OutputSpec(
        labels=tmp_path / "l.png", probs=tmp_path / "p.npy", overlay=tmp_path / "o.png"
    )
    with pytest.raises(RuntimeFailure) as caught:
        write_outputs(spec, image, scores, labels, "CHW")
    assert str(caught.value) == f"{tmp_path / 'o.png'}: cannot write: No space left on device"
    assert list(tmp_path.iterdir()) == []


def _written_probabilities(tmp_path: Path, gaps: np.ndarray) -> np.ndarray:
    """The probabilities ``write_outputs`` writes, ``[C,2,3]``, for scores that are ``gaps``
    ``[C]`` at every pixel."""
    scores = np.broadcast_to(gaps[:, None, None], (len(gaps), 2, 3)).copy()
    path = tmp_path / "p.npy"
    write_outputs(
        OutputSpec(labels=tmp_path / "l.npy", probs=path), np.zeros((2, 3)), scores,
        np.zeros((2, 3), np.int64), "CHW",
    )  # fmt: skip
    return np.load(path)


def test_probabilities_of_confident_scores_flush_below_the_normal_range(tmp_path):
    gaps = np.array([0.0, -200.0, -95.0, -50.0, -86.0], np.float32)  # score - max, per class
    probs = _written_probabilities(tmp_path, gaps)[:, 0, 0].astype(np.float64)
    exact = np.exp(gaps.astype(np.float64)) / np.exp(gaps.astype(np.float64)).sum()
    assert probs[1] == 0 and probs[2] == 0  # exact values 1e-87 and 5.8e-42 (denormal)
    np.testing.assert_allclose(probs[[0, 3, 4]], exact[[0, 3, 4]], rtol=1e-6)


def test_probabilities_that_the_normalisation_makes_denormal_are_written_as_zero(tmp_path):
    # 20 equal classes and one 86.5 below them: exp(-86.5) is a normal float32, but divided
    # by the sum (20) it is 1.4e-39, a denormal number
    gaps = np.zeros(21, np.float32)
    gaps[0] = -86.5
    probs = _written_probabilities(tmp_path, gaps)
    assert np.all(probs[0] == 0)
    tiny = np.finfo(np.float32).tiny
    assert not np.any((probs > 0) & (probs < tiny))
    np.testing.assert_allclose(probs[1:], 0.05, rtol=1e-6)


def test_outputs_are_written_through_symlinks_and_never_over_special_files(tmp_path):
    image, scores, labels = _item()
    (tmp_path / "real").mkdir()
    (tmp_path / "link.npy").symlink_to(tmp_path / "real" / "l.npy")  # dangling for now
    spec = OutputSpec(labels=tmp_path / "link.npy")
    check_outputs(spec, [])
    write_outputs(spec, image, scores, labels, "CHW")
    assert (tmp_path / "link.npy").is_symlink()  # the link is kept, its target written
    np.testing.assert_array_equal(np.load(tmp_path / "real" / "l.npy"), labels)
    write_outputs(spec, image, scores, labels + 1, "CHW")  # and replaced through the link
    np.testing.assert_array_equal(np.load(tmp_path / "link.npy"), labels + 1)
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(BadInputError, match="fifo.png: is a device, FIFO or socket, not a"):
        check_outputs(OutputSpec(labels=tmp_path / "fifo.png"), [])
    with pytest.raises(BadInputError, match="^/dev/null: is a device, FIFO or socket"):
        outputs.check_output_file(Path("/dev/null"))
    assert (tmp_path / "fifo.png").is_fifo()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 30 * 40, dtype=np.float32).reshape(2, 30, 40),
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.zeros((0, 3), np.float16),
    ],
)
def test_write_npy_writes_the_bytes_of_np_save(array):
    written, saved = io.BytesIO(), io.BytesIO()
    atomic.write_npy(written, array)
    np.save(saved, array)
    assert written.getvalue() == saved.getvalue()


_WRITE_OVER_SIZE_LIMIT = """
import resource, signal, sys
import numpy as np
from convcrf_cli import outputs
from convcrf_cli.errors import RuntimeFailure
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    outputs.write_probabilities(sys.argv[1], np.zeros((2, 40, 50)), "CHW", "float32")
except RuntimeFailure as exc:
    print(exc)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ")
def test_a_write_that_stops_part_way_says_why(tmp_path):
    # the header and part of the data are written, then the file may not grow (as on a full
    # disk): NumPy's own writer said only "N requested and M written"
    target = tmp_path / "p.npy"
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_OVER_SIZE_LIMIT, str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == f"{target}: cannot write: File too large\n", done.stderr
    assert list(tmp_path.iterdir()) == []
