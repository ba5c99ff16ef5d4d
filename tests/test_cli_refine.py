"""``convcrf refine`` end to end: results against the float64 reference, outputs, pipes and every
bad-input case (one-line message naming the file, exit status, no output left behind)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import reference
import torch
from conftest import _gpu_available, cli_runner
from PIL import Image
from test_imageio import bomb_png
from test_unary import npy_header

from convcrf_cli import CRFParams, outputs
from convcrf_cli.backends import cpu
from convcrf_cli.backends.cpu import CPUBackend
from convcrf_cli.cli import main
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.imageio import EXIF_ORIENTATION_TAG
from convcrf_cli.outputs import OutputSpec
from convcrf_cli.pipeline import refine_item

H, W, C = 24, 32, 3


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A two-region RGB image ``[H,W,3] uint8`` and noisy probabilities ``[C,H,W] float32``."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((H, W), int)
    truth[:, W // 2 :] = 1
    truth[H // 2 :, : W // 3] = 2
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    image = np.clip(colours[truth] + rng.normal(0, 10, (H, W, 3)), 0, 255).astype(np.uint8)
    scores = np.eye(C)[truth].transpose(2, 0, 1) * 2.0 + rng.normal(0, 1.2, (C, H, W))
    e = np.exp(scores - scores.max(axis=0))
    return image, (e / e.sum(axis=0)).astype(np.float32)


@pytest.fixture
def case(tmp_path):
    image, probs = _scene()
    Image.fromarray(image).save(tmp_path / "img.png")
    np.save(tmp_path / "probs.npy", probs)
    return tmp_path, image, probs


def _run(*args: object):
    return cli_runner().invoke(main, ["refine", *map(str, args)])


def _expected_labels(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    return reference.refine(image, logits, CRFParams()).argmax(axis=0)


def _labels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_refined_labels_equal_the_reference(case):
    tmp_path, image, probs = case
    result = _run(tmp_path / "img.png", tmp_path / "probs.npy", "-o", tmp_path / "out/l.png")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    expected = _expected_labels(image, np.log(np.maximum(probs, 1e-6)))
    np.testing.assert_array_equal(_labels(tmp_path / "out/l.png"), expected)
    assert (expected != probs.argmax(axis=0)).any()  # the CRF changed something


def test_prob_logit_and_energy_inputs_give_the_same_labels(case):
    tmp_path, _, probs = case
    np.save(tmp_path / "logits.npy", np.log(probs) - 3.0)
    np.save(tmp_path / "energy.npy", -np.log(probs))
    outputs = []
    for name, kind in (("probs", "prob"), ("logits", "logit"), ("energy", "energy")):
        out = tmp_path / f"{name}.png"
        result = _run(
            tmp_path / "img.png", tmp_path / f"{name}.npy", "--unary-type", kind, "-o", out
        )
        assert result.exit_code == 0, result.stderr
        outputs.append(_labels(out))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_probabilities_keep_the_input_layout_and_dtype_and_overlay_is_written(case):
    tmp_path, image, probs = case
    np.save(tmp_path / "hwc.npy", probs.transpose(1, 2, 0))
    result = _run(
        tmp_path / "img.png",
        tmp_path / "hwc.npy",
        "-o",
        tmp_path / "l.npy",
        "--probs",
        tmp_path / "p.npy",
        "--probs-dtype",
        "float16",
        "--overlay",
        tmp_path / "o.jpg",
        "--alpha",
        "0.3",
    )
    assert result.exit_code == 0, result.stderr
    refined = np.load(tmp_path / "p.npy")
    assert refined.dtype == np.float16 and refined.shape == (H, W, C)
    final = reference.refine(image, np.log(np.maximum(probs, 1e-6)), CRFParams())
    expected = reference.softmax(final).transpose(1, 2, 0)
    np.testing.assert_allclose(refined, expected, atol=2e-3)
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), final.argmax(axis=0))
    overlay = Image.open(tmp_path / "o.jpg")
    assert overlay.mode == "RGB" and overlay.size == (W, H)


def test_label_image_unary(case):
    tmp_path, image, probs = case
    labels = probs.argmax(axis=0).astype(np.uint8)
    labels[:2] = 255
    Image.fromarray(labels).save(tmp_path / "seg.png")
    result = _run(
        tmp_path / "img.png",
        tmp_path / "seg.png",
        "-o",
        tmp_path / "l.png",
        "--label-confidence",
        "0.8",
        "--ignore-label",
        "255",
        "-v",
    )
    assert result.exit_code == 0, result.stderr
    logits = np.where(np.eye(C, dtype=bool)[np.minimum(labels, C - 1)].transpose(2, 0, 1), 0.8, 0.1)
    logits = np.log(logits)
    logits[:, labels == 255] = 0.0
    np.testing.assert_array_equal(_labels(tmp_path / "l.png"), _expected_labels(image, logits))
    assert "label map, 3 classes, confidence 0.8" in result.stderr


def test_verbose_reports_device_layout_kind_and_timing(case):
    tmp_path, _, _ = case
    result = _run(tmp_path / "img.png", tmp_path / "probs.npy", "-o", tmp_path / "l.png", "-v")
    assert result.exit_code == 0 and result.stdout == ""
    assert "convcrf: device: cpu" in result.stderr
    assert "CHW float32" in result.stderr and "probabilities (auto)" in result.stderr
    assert "refined in" in result.stderr


def _exif_jpeg(path, image: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(image).save(path, exif=exif, quality=95)


def test_exif_rotation_must_match_the_unary(case):
    tmp_path, image, probs = case
    _exif_jpeg(tmp_path / "rot.jpg", image, 6)  # shown rotated 90° clockwise: W×H
    stored = _run(tmp_path / "rot.jpg", tmp_path / "probs.npy", "-o", tmp_path / "a.png")
    assert stored.exit_code == 2
    assert "fits" in stored.stderr and "--exif-orientation ignore" in stored.stderr
    ignored = _run(
        tmp_path / "rot.jpg",
        tmp_path / "probs.npy",
        "-o",
        tmp_path / "a.png",
        "--exif-orientation",
        "ignore",
    )
    assert ignored.exit_code == 0, ignored.stderr
    np.save(tmp_path / "shown.npy", np.rot90(probs, k=-1, axes=(1, 2)))
    shown = _run(tmp_path / "rot.jpg", tmp_path / "shown.npy", "-o", tmp_path / "b.png")
    assert shown.exit_code == 0 and shown.stderr == ""
    assert _labels(tmp_path / "b.png").shape == (W, H)
    _exif_jpeg(tmp_path / "flip.jpg", image, 3)  # 180°: the size cannot tell
    flipped = _run(tmp_path / "flip.jpg", tmp_path / "probs.npy", "-o", tmp_path / "c.png")
    assert flipped.exit_code == 0
    assert "warning" in flipped.stderr and "EXIF orientation 3" in flipped.stderr


def _low_res(probs: np.ndarray) -> np.ndarray:
    """``probs`` at 8×11, about a third of the 24×32 image a side (a stride-3 segmenter)."""
    return np.ascontiguousarray(probs[:, 1::3, ::3])


def test_a_low_resolution_unary_refines_as_its_upsampled_logits(case):
    tmp_path, image, probs = case
    small = _low_res(probs)
    np.save(tmp_path / "small.npy", small.transpose(1, 2, 0))  # HWC
    upsampled = reference.resize_bilinear(np.log(np.maximum(small, 1e-6)), H, W)
    np.save(tmp_path / "up.npy", upsampled.astype(np.float32))
    resized = _run(tmp_path / "img.png", tmp_path / "small.npy", "-o", tmp_path / "a.png",
                   "--probs", tmp_path / "a.npy", "--resize-unary", "bilinear", "-v")  # fmt: skip
    assert resized.exit_code == 0, resized.stderr
    assert (
        f"convcrf: note: {tmp_path / 'small.npy'}: unary resized from 8×11 to 24×32 (bilinear, "
        "on the logits)\n" in resized.stderr
    )
    direct = _run(tmp_path / "img.png", tmp_path / "up.npy", "-o", tmp_path / "b.png",
                  "--probs", tmp_path / "b.npy", "--unary-type", "logit")  # fmt: skip
    assert direct.exit_code == 0, direct.stderr
    labels = _labels(tmp_path / "a.png")
    np.testing.assert_array_equal(labels, _labels(tmp_path / "b.png"))
    np.testing.assert_array_equal(labels, _expected_labels(image, upsampled))
    refined = np.load(tmp_path / "a.npy")  # the image's size, the unary's layout
    assert refined.shape == (H, W, C)
    np.testing.assert_allclose(refined, np.load(tmp_path / "b.npy").transpose(1, 2, 0), atol=1e-5)


def test_without_resize_unary_a_low_resolution_unary_is_refused_with_a_hint(case):
    tmp_path, _, probs = case
    np.save(tmp_path / "small.npy", _low_res(probs))
    refused = _run(tmp_path / "img.png", tmp_path / "small.npy", "-o", tmp_path / "a.png")
    assert refused.exit_code == 2 and not (tmp_path / "a.png").exists()
    assert refused.stderr == (
        f"convcrf: error: {tmp_path / 'small.npy'}: unary shape (3, 8, 11) does not fit the "
        "24×32 image: expected (C, 24, 32) or (24, 32, C); --resize-unary bilinear resizes a "
        "unary of another size to the image's\n"
    )
    np.save(tmp_path / "stretched.npy", np.full((C, 16, 16), 1 / C, np.float32))
    ambiguous = _run(tmp_path / "img.png", tmp_path / "stretched.npy", "-o", tmp_path / "a.png",
                     "--resize-unary", "bilinear")  # fmt: skip
    assert ambiguous.exit_code == 2 and "--layout" in ambiguous.stderr
    assert len(ambiguous.stderr.splitlines()) == 1
    named = _run(tmp_path / "img.png", tmp_path / "stretched.npy", "-o", tmp_path / "a.png",
                 "--resize-unary", "bilinear", "--layout", "CHW")  # fmt: skip
    assert named.exit_code == 0 and named.stderr == ""


def test_a_label_image_unary_is_resized_by_nearest_neighbour(case):
    tmp_path, image, probs = case
    small = _low_res(probs).argmax(axis=0).astype(np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    rows, cols = (np.arange(H) + 0.5) * 8 / H, (np.arange(W) + 0.5) * 11 / W
    large = small[rows.astype(int)[:, None], cols.astype(int)[None, :]]
    Image.fromarray(large).save(tmp_path / "large.png")
    for name in ("small", "large"):
        result = _run(tmp_path / "img.png", tmp_path / f"{name}.png", "-o",
                      tmp_path / f"{name}_out.png", "--resize-unary", "bilinear")  # fmt: skip
        assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(
        _labels(tmp_path / "small_out.png"), _labels(tmp_path / "large_out.png")
    )


def test_a_resized_unary_must_have_the_aspect_ratio_of_the_exif_orientation(case):
    tmp_path, image, probs = case
    _exif_jpeg(tmp_path / "rot.jpg", image, 6)  # shown 32×24; stored 24×32
    np.save(tmp_path / "stored.npy", _low_res(probs))  # 8×11: the stored aspect ratio
    resize = ("--resize-unary", "bilinear")
    stored = _run(tmp_path / "rot.jpg", tmp_path / "stored.npy", "-o", tmp_path / "a.png", *resize)
    assert stored.exit_code == 2 and not (tmp_path / "a.png").exists()
    assert stored.stderr == (
        f"convcrf: error: {tmp_path / 'stored.npy'}: unary fits {tmp_path / 'rot.jpg'} as stored "
        "(24×32), not as used (32×24, EXIF orientation 6 (rotated 90° clockwise) applied); pass "
        "--exif-orientation ignore if the segmenter saw it that way\n"
    )
    ignored = _run(tmp_path / "rot.jpg", tmp_path / "stored.npy", "-o", tmp_path / "a.png",
                   "--exif-orientation", "ignore", *resize)  # fmt: skip
    assert ignored.exit_code == 0 and ignored.stderr == ""
    assert _labels(tmp_path / "a.png").shape == (H, W)
    np.save(tmp_path / "shown.npy", np.rot90(_low_res(probs), k=-1, axes=(1, 2)))  # 11×8
    shown = _run(tmp_path / "rot.jpg", tmp_path / "shown.npy", "-o", tmp_path / "b.png", *resize)
    assert shown.exit_code == 0 and shown.stderr == ""  # the aspect ratio confirms it
    assert _labels(tmp_path / "b.png").shape == (W, H)
    np.save(tmp_path / "square.npy", np.full((C, 16, 16), 1 / C, np.float32))
    stretched = _run(tmp_path / "rot.jpg", tmp_path / "square.npy", "-o", tmp_path / "c.png",
                     "--layout", "CHW", *resize)  # fmt: skip
    assert stretched.exit_code == 0  # neither aspect ratio: as a square image, a warning
    assert "warning" in stretched.stderr and "EXIF orientation 6" in stretched.stderr


def _bad_cases(tmp_path, image, probs):
    """(name, image, unary, extra args, path the message names, problem text)."""
    Image.fromarray(image).save(tmp_path / "img.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    (tmp_path / "bomb.png").write_bytes(bomb_png(60_000, 60_000))
    np.save(tmp_path / "good.npy", probs)
    data = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) - 100])
    (tmp_path / "text.npy").write_text("hello\n")
    (tmp_path / "text.npz").write_text("hello\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "declared.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("unary.npy", npy_header((3, 8000, 8000)))  # header only: not inflated
    (tmp_path / "unaries").mkdir()
    nan = probs.copy()
    nan[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    negative = probs.copy()
    negative[0, 0, 0] = -0.5
    np.save(tmp_path / "neg.npy", negative)
    np.save(tmp_path / "axis.npy", probs.transpose(1, 0, 2))
    np.save(tmp_path / "many.npy", np.zeros((257, H, W), np.float32))
    np.save(tmp_path / "huge.npy", np.log(probs.astype(np.float64)) * 1e39)
    np.save(tmp_path / "none.npy", np.zeros((0, H, W), np.float32))
    np.save(tmp_path / "fg.npy", probs[1:2])
    Image.fromarray(probs.argmax(axis=0).astype(np.uint8)).save(tmp_path / "seg.png")
    nan_image = np.zeros((H, W), np.float32)
    nan_image[4, 5] = np.nan
    Image.fromarray(nan_image).save(tmp_path / "nan.tif")
    huge_image = np.ones((H, W), np.float32)
    huge_image[4:6, 5] = 2e38  # finite, but their cell of --blur 3 sums to 4e38
    Image.fromarray(huge_image).save(tmp_path / "huge.tif")
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe\x00{")
    (tmp_path / "long.json").write_text('{"pos_sdims": 1' + "0" * 400 + "}")
    (tmp_path / "longer.json").write_text('{"filter_size": 1' + "0" * 5000 + "}")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.npy")
    (tmp_path / "loop.npy").symlink_to(tmp_path / "loop.png")
    long_png, long_npy = (tmp_path / ("a" * 300 + suffix) for suffix in (".png", ".npy"))
    long_probs = tmp_path / ("b" * 300 + ".npy")  # in a directory that exists
    img, good = tmp_path / "img.png", tmp_path / "good.npy"
    xbm = tmp_path.parent / "out" / "o.xbm"
    return [
        ("missing image", tmp_path / "nope.png", good, [], tmp_path / "nope.png", "no such file"),
        ("image on stdin", "-", good, [], "-", "the image is read from a file, not stdin"),
        ("missing unary", img, tmp_path / "nope.npy", [], tmp_path / "nope.npy", "no such file"),
        ("unreadable image", tmp_path, good, [], tmp_path, "is a directory"),
        ("corrupt image", tmp_path / "corrupt.jpg", good, [], tmp_path / "corrupt.jpg", "corrupt"),
        ("truncated npy", img, tmp_path / "cut.npy", [], tmp_path / "cut.npy", "truncated"),
        ("text as npy", img, tmp_path / "text.npy", [], tmp_path / "text.npy",
         "not a .npy file (no NumPy header)"),
        ("text as npz", img, tmp_path / "text.npz", [], tmp_path / "text.npz",
         "not a .npz file (not a zip archive)"),
        ("empty npy", img, tmp_path / "empty.npy", [], tmp_path / "empty.npy",
         "not a .npy file (empty file)"),
        ("object npy", img, tmp_path / "objects.npy", [], tmp_path / "objects.npy",
         "holds Python objects"),
        ("npz declaring 3×8000×8000", img, tmp_path / "declared.npz", [],
         tmp_path / "declared.npz", "unary shape (3, 8000, 8000) does not fit the 24×32 image"),
        ("directory as unary", img, tmp_path / "unaries", [], tmp_path / "unaries",
         "is a directory"),
        ("nan", img, tmp_path / "nan.npy", [], tmp_path / "nan.npy", "NaN"),
        ("negative", img, tmp_path / "neg.npy", ["--unary-type", "prob"], tmp_path / "neg.npy",
         "negative probability"),
        ("class axis", img, tmp_path / "axis.npy", [], tmp_path / "axis.npy", "class axis"),
        ("257 classes", img, tmp_path / "many.npy", [], None, "257 classes do not fit"),
        ("too large", tmp_path / "bomb.png", good, [], tmp_path / "bomb.png", "too large"),
        ("nan image", tmp_path / "nan.tif", good, [], tmp_path / "nan.tif",
         "image holds NaN or infinite values"),
        ("beyond float32", img, tmp_path / "huge.npy", [], tmp_path / "huge.npy",
         "beyond the float32 range"),
        ("image overflowing when pooled", tmp_path / "huge.tif", good, [], tmp_path / "huge.tif",
         "values summed over a cell of --blur 3 reach 4e+38, beyond float32 (±3.4e+38)"),
        ("no classes", img, tmp_path / "none.npy", [], tmp_path / "none.npy", "no classes"),
        ("foreground as 1 class", img, tmp_path / "fg.npy", ["--num-classes", "1"],
         tmp_path / "fg.npy", "--num-classes is 1"),
        ("labels, 10^8 classes", img, tmp_path / "seg.png", ["--num-classes", "100000000"], None,
         "100000000 classes do not fit a PNG label map"),
        ("overlay format", img, good, ["--overlay", xbm], xbm, "cannot write the overlay"),
        ("params not utf-8", img, good, ["--params", tmp_path / "latin1.json"],
         tmp_path / "latin1.json", "not UTF-8"),
        ("params long int", img, good, ["--params", tmp_path / "long.json"],
         tmp_path / "long.json", "pos_sdims must be a positive number in float32's range"),
        ("params longer int", img, good, ["--params", tmp_path / "longer.json"],
         tmp_path / "longer.json", "filter_size must be an integer"),
        ("params nested deeply", img, good, ["--params", tmp_path / "deep.json"],
         tmp_path / "deep.json", "not valid JSON: nested too deeply"),
        # Path.exists raises for the next three before Python 3.12 (tracebacks) or says False
        ("image name too long", long_png, good, [], long_png, "cannot read: File name too long"),
        ("unary name too long", img, long_npy, [], long_npy, "cannot read: File name too long"),
        ("probs name too long", img, good, ["--probs", long_probs], long_probs,
         "cannot write: File name too long"),
        ("image symlink loop", tmp_path / "loop.png", good, [], tmp_path / "loop.png",
         "cannot read: Too many levels of symbolic links"),
        ("unary symlink loop", img, tmp_path / "loop.npy", [], tmp_path / "loop.npy",
         "cannot read: Too many levels of symbolic links"),
    ]  # fmt: skip


def test_each_bad_input_is_one_line_exit_2_and_leaves_no_output(tmp_path):
    image, probs = _scene()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, img, unary, extra, named, problem in _bad_cases(inputs, image, probs):
        out = tmp_path / "out" / "labels.png"
        result = _run(img, unary, "-o", out, "--overlay", tmp_path / "out/o.png", *extra)
        assert result.exit_code == 2, name
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("convcrf: error: "), name
        assert problem in lines[0], (name, lines[0])
        assert str(named if named is not None else out) in lines[0], (name, lines[0])
        assert result.stdout == "", name
        # Faults are found before the CRF runs: not even the output directory exists.
        assert not (tmp_path / "out").exists(), name


def test_a_mean_field_overflowing_float32_names_the_unary_and_writes_nothing(case):
    # weight 1e38 is within float32's range, the message times it is not: NaN scores, which
    # gave an all-0 label map and exit 0.
    tmp_path, _, _ = case
    out = tmp_path / "out" / "labels.png"
    result = _run(tmp_path / "img.png", tmp_path / "probs.npy", "-o", out, "--weight", "1e38")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"convcrf: error: {tmp_path / 'probs.npy'}: the mean field gave")
    assert not (tmp_path / "out").exists()


def test_single_channel_foreground_takes_num_classes_2(case):
    tmp_path, _, probs = case
    np.save(tmp_path / "fg.npy", probs[1:2])
    result = _run(tmp_path / "img.png", tmp_path / "fg.npy", "--num-classes", "2", "-o",
                  tmp_path / "l.npy")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert set(np.unique(np.load(tmp_path / "l.npy"))) <= {0, 1}


def test_unwritable_overlay_format_is_refused_before_any_output(case):
    tmp_path, _, _ = case
    part = tmp_path / "part"
    result = _run(tmp_path / "img.png", tmp_path / "probs.npy", "-o", part / "l.png",
                  "--probs", part / "p.npy", "--overlay", part / "o.xbm")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith(f"convcrf: error: {part / 'o.xbm'}: ")
    assert not part.exists()


def test_a_failed_write_leaves_none_of_the_outputs(case, monkeypatch):
    tmp_path, _, _ = case

    def failing_overlay(path, *args, **kwargs):
        raise RuntimeFailure(f"{path}: cannot write: Disk quota exceeded")

    monkeypatch.setattr(outputs, "write_overlay", failing_overlay)
    part = tmp_path / "part"
    before = sorted(tmp_path.iterdir())
    result = _run(tmp_path / "img.png", tmp_path / "probs.npy", "-o", part / "l.png",
                  "--probs", tmp_path / "p.npy", "--overlay", part / "sub" / "o.png")  # fmt: skip
    assert result.exit_code == 1
    expected = f"convcrf: error: {part / 'sub' / 'o.png'}: cannot write: Disk quota exceeded\n"
    assert result.stderr == expected
    assert sorted(tmp_path.iterdir()) == before  # no output, no directory made for them


def test_torch_running_out_of_memory_is_one_line_exit_1_without_output(case, monkeypatch):
    tmp_path, _, _ = case

    def allocate_too_much(image, logits, params):
        return torch.empty(1 << 60, dtype=torch.uint8)  # torch's RuntimeError, not MemoryError

    monkeypatch.setattr(cpu, "mean_field_scores", allocate_too_much)
    before = sorted(tmp_path.iterdir())
    result = _run(tmp_path / "img.png", tmp_path / "probs.npy", "-o", tmp_path / "l.png",
                  "--device", "cpu")  # fmt: skip
    assert (result.exit_code, result.stderr) == (
        1,
        "convcrf: error: out of memory: the image is too large for this machine (try a larger "
        "--blur or a smaller image)\n",
    )
    assert sorted(tmp_path.iterdir()) == before


def test_invalid_pixel_limit_variable_fails_only_where_it_is_used(case):
    tmp_path, _, _ = case
    env = {"CONVCRF_MAX_PIXELS": "1e6"}
    assert cli_runner(env=env).invoke(main, ["params"]).exit_code == 0
    result = cli_runner(env=env).invoke(
        main, ["refine", str(tmp_path / "img.png"), str(tmp_path / "probs.npy"), "-o", "l.png"]
    )
    assert result.exit_code == 2
    assert result.stderr == (
        "convcrf: error: CONVCRF_MAX_PIXELS: must be a positive whole number of pixels, got '1e6'\n"
    )


def test_too_large_for_memory_is_refused_before_computing(case):
    tmp_path, _, _ = case
    spec = OutputSpec(labels=tmp_path / "out" / "l.png")
    with pytest.raises(BadInputError, match="too large for memory") as caught:
        refine_item(
            tmp_path / "img.png",
            tmp_path / "probs.npy",
            spec,
            CRFParams(),
            CPUBackend(),
            memory_limit=10_000,
        )
    assert str(tmp_path / "img.png") in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_directories_are_pointed_to_batch(case):
    tmp_path, _, _ = case
    images, unaries = tmp_path / "images", tmp_path / "unaries"
    images.mkdir()
    unaries.mkdir()
    result = _run(images, unaries, "-o", tmp_path / "out.png")
    assert result.exit_code == 2
    assert result.stderr == (
        f"convcrf: error: {images}: is a directory; `convcrf batch IMAGES_DIR UNARIES_DIR "
        "-o OUT_DIR` refines directories\n"
    )


@pytest.mark.skipif(_gpu_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_clear_error(case):
    tmp_path, _, _ = case
    result = _run(tmp_path / "img.png", tmp_path / "probs.npy", "-o", tmp_path / "l.png",
                  "--device", "cuda")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith("convcrf: error: cannot use device 'cuda': ")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "l.png").exists()


def _subprocess(args: list[object], stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convcrf_cli", "refine", *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def test_pillow_warnings_on_damaged_metadata_stay_off_stderr(case):
    # Pillow warns (two lines naming its own source: 'Tag data larger than file') about an EXIF
    # block cut short, which a JPEG can carry and still be read, and about a TIFF cut inside
    # its tags; stderr is to hold the tool's lines only.
    tmp_path, image, _ = case
    exif = Image.Exif()
    exif[0x010E] = "a description long enough to be stored after the tags"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", exif=exif)
    data = buffer.getvalue()
    start = data.index(b"Exif\0\0")
    length = int.from_bytes(data[start - 2 : start], "big")
    body = data[start : start - 2 + length][:-30]  # the description cut off
    jpeg = data[: start - 2] + (len(body) + 2).to_bytes(2, "big") + body
    (tmp_path / "exif.jpg").write_bytes(jpeg + data[start - 2 + length :])
    done = _subprocess(
        [tmp_path / "exif.jpg", tmp_path / "probs.npy", "-o", tmp_path / "l.png"], b""
    )
    assert (done.returncode, done.stderr) == (0, b"")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="TIFF")
    (tmp_path / "cut.tif").write_bytes(buffer.getvalue()[:50])
    done = _subprocess(
        [tmp_path / "cut.tif", tmp_path / "probs.npy", "-o", tmp_path / "t.png"], b""
    )
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"convcrf: error: {tmp_path / 'cut.tif'}: not an image format Pillow can read (corrupt?)"
    ]


def test_stdin_unary_and_stdout_png_through_a_real_process(case):
    tmp_path, image, probs = case
    buffer = io.BytesIO()
    np.save(buffer, probs)
    done = _subprocess([tmp_path / "img.png", "-", "-o", "-", "-v"], buffer.getvalue())
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(b"\x89PNG\r\n\x1a\n")
    picture = Image.open(io.BytesIO(done.stdout))
    picture.load()
    assert picture.mode == "P"
    # stdout holds the PNG and nothing else: it ends with the one IEND chunk.
    assert done.stdout.endswith(b"IEND\xaeB`\x82") and done.stdout.count(b"IEND") == 1
    expected = _expected_labels(image, np.log(np.maximum(probs, 1e-6)))
    np.testing.assert_array_equal(np.asarray(picture), expected)
    assert b"convcrf: device:" in done.stderr and b"unary: stdin" in done.stderr

    nan = probs.copy()
    nan[0, 0, 0] = np.nan
    buffer = io.BytesIO()
    np.save(buffer, nan)
    failed = _subprocess([tmp_path / "img.png", "-", "-o", "-"], buffer.getvalue())
    assert failed.returncode == 2 and failed.stdout == b""
    assert failed.stderr.decode().strip().startswith("convcrf: error: stdin: unary holds 1 NaN")


def _png_to_stdout_command(tmp_path) -> list[object]:
    """``convcrf refine`` of the case's image and probabilities with the PNG on stdout."""
    return [sys.executable, "-m", "convcrf_cli", "refine", tmp_path / "img.png",
            tmp_path / "probs.npy", "-o", "-"]  # fmt: skip


def test_closed_stdout_pipe_is_a_runtime_failure(case):
    tmp_path, _, _ = case
    process = subprocess.Popen(
        _png_to_stdout_command(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert (
        stderr == "convcrf: error: stdout: the reader closed the pipe before the PNG was written\n"
    )


def _run_png_to_stdout(tmp_path, **streams) -> tuple[int, str]:
    """Run :func:`_png_to_stdout_command` with ``streams`` (subprocess.run's stdout, stdin,
    preexec_fn); return its exit status and stderr."""
    done = subprocess.run(
        _png_to_stdout_command(tmp_path), stderr=subprocess.PIPE, timeout=120, **streams
    )
    return done.returncode, done.stderr.decode()


def test_closed_stdout_is_a_runtime_failure(case):
    tmp_path, _, _ = case
    status, stderr = _run_png_to_stdout(
        tmp_path, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(1)
    )
    assert status == 1
    assert stderr == "convcrf: error: stdout: closed; there is nowhere to write the PNG\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_stdout_is_a_runtime_failure(case):
    tmp_path, _, _ = case
    with open("/dev/full", "wb") as full:
        status, stderr = _run_png_to_stdout(tmp_path, stdout=full)
    assert status == 1
    assert stderr == "convcrf: error: stdout: cannot write the PNG: No space left on device\n"


def test_parameters_can_come_from_stdin(case):
    tmp_path, _, _ = case
    piped = CRFParams(filter_size=3, iterations=2, init="log").to_json()
    inputs = (tmp_path / "img.png", tmp_path / "probs.npy")
    result = cli_runner().invoke(
        main, ["refine", *map(str, inputs), "-o", str(tmp_path / "a.npy"), "--params", "-"],
        input=piped,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (
        _run(*inputs, "-o", tmp_path / "b.npy", "-k", "3", "-n", "2", "--init", "log").exit_code
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    bad = cli_runner().invoke(main, ["refine", *map(str, inputs), "-o", "c.npy", "--params", "-"],
                             input="[1]")  # fmt: skip
    assert bad.exit_code == 2
    assert bad.stderr == "convcrf: error: stdin: expected a JSON object of parameters, got list\n"
