"""Unary reading: layouts, unary types, label maps, stdin and bad arrays."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from convcrf_cli.errors import BadInputError, RuntimeFailure, unreadable
from convcrf_cli.unary import PROB_EPS, count_classes, load_unary, read_unary

H, W, C = 24, 32, 5


def _probs(seed: int = 0, classes: int = C, dtype=np.float32) -> np.ndarray:
    """``[C,H,W]`` probabilities summing to 1 over classes."""
    scores = np.random.default_rng(seed).normal(0, 2, (classes, H, W))
    e = np.exp(scores - scores.max(axis=0))
    return (e / e.sum(axis=0)).astype(dtype)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=0)
    return x - m - np.log(np.exp(x - m).sum(axis=0))


def _npy(tmp_path, array: np.ndarray, name: str = "u.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def _error(source, hw=(H, W), **kwargs) -> str:
    with pytest.raises(BadInputError) as caught:
        read_unary(source, hw, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 2
    return message


def test_chw_and_hwc_are_detected_from_the_image_size(tmp_path):
    probs = _probs()
    chw = read_unary(_npy(tmp_path, probs, "chw.npy"), (H, W))
    hwc = read_unary(_npy(tmp_path, probs.transpose(1, 2, 0), "hwc.npy"), (H, W))
    batched = read_unary(_npy(tmp_path, probs[None], "nchw.npy"), (H, W))
    assert (chw.layout, hwc.layout, batched.layout) == ("CHW", "HWC", "CHW")
    assert chw.logits.shape == (C, H, W) and chw.logits.dtype == np.float32
    np.testing.assert_array_equal(chw.logits, hwc.logits)
    np.testing.assert_array_equal(chw.logits, batched.logits)


def test_ambiguous_square_shape_names_both_readings_and_layout_resolves_it(tmp_path):
    cube = np.full((8, 8, 8), 0.125, np.float32)
    path = _npy(tmp_path, cube)
    message = _error(path, (8, 8))
    assert "(8, 8, 8)" in message and "CHW" in message and "HWC" in message
    assert str(path) in message
    assert read_unary(path, (8, 8), layout="HWC").layout == "HWC"


def test_mismatched_shape_names_both_shapes(tmp_path):
    path = _npy(tmp_path, np.zeros((C, 10, 12), np.float32))
    message = _error(path)
    assert "(5, 10, 12)" in message and f"{H}×{W}" in message and str(path) in message
    assert f"(C, {H}, {W})" in message


def test_class_axis_in_the_middle_and_swapped_sizes(tmp_path):
    middle = _error(_npy(tmp_path, _probs().transpose(1, 0, 2)))
    assert "class axis is in the middle" in middle
    swapped = _error(_npy(tmp_path, _probs().transpose(0, 2, 1)))
    assert "swapped" in swapped


def test_prob_logit_and_energy_give_the_same_distribution(tmp_path):
    probs = _probs(3)
    logits = np.log(probs) + 7.0  # any per-pixel offset leaves the softmax unchanged
    energy = -np.log(probs)
    readings = [
        read_unary(_npy(tmp_path, probs, "p.npy"), (H, W), "prob"),
        read_unary(_npy(tmp_path, logits, "l.npy"), (H, W), "logit"),
        read_unary(_npy(tmp_path, energy, "e.npy"), (H, W), "energy"),
    ]
    expected = _log_softmax(np.log(probs.astype(np.float64)))
    for reading in readings:
        np.testing.assert_allclose(_log_softmax(reading.logits), expected, atol=1e-4)


def test_prob_conversion_clamps_at_eps(tmp_path):
    probs = np.zeros((2, H, W), np.float32)
    probs[0] = 1.0
    reading = read_unary(_npy(tmp_path, probs), (H, W), "prob")
    assert reading.logits[0].max() == 0.0
    assert reading.logits[1].max() == pytest.approx(np.log(PROB_EPS))


def test_auto_guesses_prob_only_for_distributions(tmp_path):
    assert read_unary(_npy(tmp_path, _probs()), (H, W)).kind == "prob"
    half = _probs(dtype=np.float16)
    assert read_unary(_npy(tmp_path, half, "h.npy"), (H, W)).kind == "prob"
    not_summing = _probs() * 0.5
    assert read_unary(_npy(tmp_path, not_summing, "s.npy"), (H, W)).kind == "logit"
    logits = np.random.default_rng(0).normal(0, 3, (C, H, W)).astype(np.float32)
    reading = read_unary(_npy(tmp_path, logits, "l.npy"), (H, W))
    assert reading.kind == "logit"
    np.testing.assert_array_equal(reading.logits, logits)
    assert not reading.warnings


def test_auto_warns_when_logits_look_like_energies(tmp_path):
    energy = -np.log(_probs())
    reading = read_unary(_npy(tmp_path, energy), (H, W))
    assert reading.kind == "logit"
    assert "--unary-type energy" in reading.warnings[0]


def test_single_channel_is_a_foreground_score(tmp_path):
    p = _probs(classes=2)[1:]
    prob = read_unary(_npy(tmp_path, p.transpose(1, 2, 0), "p.npy"), (H, W))
    assert prob.kind == "prob" and prob.logits.shape == (2, H, W)
    np.testing.assert_allclose(np.exp(prob.logits[1]), np.maximum(p[0], PROB_EPS), rtol=1e-5)
    np.testing.assert_allclose(np.exp(prob.logits[0]), np.maximum(1 - p[0], PROB_EPS), rtol=1e-5)
    z = np.random.default_rng(0).normal(0, 3, (1, H, W)).astype(np.float32)
    logit = read_unary(_npy(tmp_path, z, "z.npy"), (H, W))
    softmax_fg = 1 / (1 + np.exp(logit.logits[0] - logit.logits[1]))
    np.testing.assert_allclose(softmax_fg, 1 / (1 + np.exp(-z[0])), rtol=1e-5)
    assert "single channel" in _error(_npy(tmp_path, z, "e.npy"), unary_type="energy")


def test_num_classes_of_a_single_channel_counts_the_two_classes_it_becomes(tmp_path):
    path = _npy(tmp_path, _probs(classes=2)[1:])
    assert read_unary(path, (H, W), num_classes=2).logits.shape == (2, H, W)
    message = _error(path, num_classes=1)
    assert "one channel" in message and "2 classes" in message
    assert message.endswith("--num-classes is 1")
    assert "--num-classes is 3" in _error(path, num_classes=3)


def test_an_npz_without_arrays_says_so(tmp_path):
    np.savez(tmp_path / "empty.npz")
    assert _error(tmp_path / "empty.npz").endswith(".npz holds no arrays")
    assert _error("-", stdin=io.BytesIO((tmp_path / "empty.npz").read_bytes())).endswith(
        ".npz holds no arrays"
    )


def test_npz_single_array_named_array_and_ambiguity(tmp_path):
    probs = _probs()
    np.savez(tmp_path / "one.npz", anything=probs)
    np.savez(tmp_path / "named.npz", unary=probs, other=np.zeros(3))
    np.savez(tmp_path / "two.npz", a=probs, b=probs)
    for name in ("one.npz", "named.npz"):
        np.testing.assert_array_equal(
            read_unary(tmp_path / name, (H, W)).logits,
            read_unary(_npy(tmp_path, probs), (H, W)).logits,
        )
    assert "'unary'" in _error(tmp_path / "two.npz")


def test_stdin_bytes(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, _probs())
    reading = read_unary("-", (H, W), stdin=io.BytesIO(buffer.getvalue()))
    np.testing.assert_array_equal(
        reading.logits, read_unary(_npy(tmp_path, _probs()), (H, W)).logits
    )
    assert "stdin" in _error("-", stdin=io.BytesIO(b""))
    assert "not .npy" in _error("-", stdin=io.BytesIO(b"P6 not numpy"))


def test_truncated_npy_names_the_file(tmp_path):
    path = _npy(tmp_path, _probs())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _error(path)
    assert str(path) in message and "truncated" in message


def test_damaged_npy_header_and_npz_data_name_the_file(tmp_path):
    # One byte changed: an unbalanced parenthesis in the header ('shape': N3, 24, 32)), and a
    # compressed member that does not inflate; NumPy raises neither as a ValueError.
    path = _npy(tmp_path, _probs())
    data = path.read_bytes()
    start = data.index(b"(", data.index(b"shape"))
    path.write_bytes(data[:start] + b"N" + data[start + 1 :])
    assert _error(path).endswith("corrupt .npy header (EOF in multi-line statement)")
    assert "corrupt .npy header" in _error("-", stdin=io.BytesIO(path.read_bytes()))
    path.write_bytes(data.replace(b"'<f4'", b"',f4'"))  # a dtype NumPy parses as a literal
    assert _error(path).endswith("corrupt .npy header (invalid syntax)")
    with zipfile.ZipFile(tmp_path / "bad_header.npz", "w") as archive:
        archive.writestr("unary.npy", path.read_bytes())
    assert "corrupt .npz header" in _error(tmp_path / "bad_header.npz")
    np.savez_compressed(tmp_path / "z.npz", unary=_probs())
    packed = bytearray((tmp_path / "z.npz").read_bytes())
    name_length, extra_length = struct.unpack("<HH", packed[26:30])  # the local file header
    packed[30 + name_length + extra_length] ^= 0xFF  # the first deflate block's header
    (tmp_path / "z.npz").write_bytes(bytes(packed))
    message = _error(tmp_path / "z.npz")
    assert message.startswith(f"{tmp_path / 'z.npz'}: corrupt or truncated .npz data (")


def test_npy_shape_is_checked_before_its_data_are_read(tmp_path):
    # A header for 21×4000×4000 floats (1.3 GB) over a sparse file: mapped, not read.
    big = tmp_path / "big.npy"
    np.lib.format.open_memmap(big, "w+", np.float32, (21, 4000, 4000)).flush()
    source = load_unary(big)
    assert isinstance(source.array, np.memmap) and source.array.shape == (21, 4000, 4000)
    with pytest.raises(BadInputError, match=rf"\(21, 4000, 4000\) does not fit the {H}×{W} "):
        count_classes(source, (H, W))
    probs = _probs()
    np.save(tmp_path / "f.npy", np.asfortranarray(probs).astype(">f4"))
    reading = read_unary(tmp_path / "f.npy", (H, W))  # big-endian, Fortran order: mapped too
    np.testing.assert_array_equal(reading.logits, np.log(np.maximum(probs, PROB_EPS)))


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` header declaring a float32 array of ``shape``, without its data."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def test_npz_shape_is_checked_before_the_member_is_inflated(tmp_path):
    # A compressed member declaring 3×8000×8000 floats (768 MB) that holds only its header:
    # inflating it fails (truncated), so only a check of the header gives the shape error.
    path = tmp_path / "big.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("unary.npy", npy_header((3, 8000, 8000)))
        archive.writestr("other.npy", b"not read")
    source = load_unary(path)
    assert source.array.shape == (3, 8000, 8000) and source.array.strides == (0, 0, 0)
    expected = f"unary shape (3, 8000, 8000) does not fit the {H}×{W} image"
    assert _error(path) == (
        f"{path}: {expected}: expected (C, {H}, {W}) or ({H}, {W}, C); --resize-unary "
        "bilinear resizes a unary of another size to the image's"
    )
    assert _error("-", stdin=io.BytesIO(path.read_bytes())).startswith(f"stdin: {expected}")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:  # it fits: inflated
        archive.writestr("unary.npy", npy_header((C, H, W)))
    assert _error(path).startswith(f"{path}: corrupt or truncated .npz data (EOF: ")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", b"hello")
    assert _error(path).startswith(f"{path}: corrupt or truncated .npz data (")
    np.savez(path, np.array([{"a": 1}], dtype=object))  # pickled (numpy < 2.1: no allow_pickle)
    assert _error(path).endswith(
        ".npz holds Python objects, which are not loaded; save a numeric array"
    )


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        ((-3, H, W), "a negative length in its shape"),
        ((10**23, H, W), "its shape declares more bytes than an array can hold"),
    ],
)
def test_npy_and_npz_headers_declaring_impossible_shapes_are_corrupt(tmp_path, shape, problem):
    # NumPy's memory map raised OverflowError (a traceback, ending a whole batch) for the
    # second, and called the first truncated data.
    path = tmp_path / "u.npy"
    path.write_bytes(npy_header(shape) + bytes(C * H * W * 4))
    assert _error(path) == f"{path}: corrupt .npy header ({problem})"
    assert _error("-", stdin=io.BytesIO(path.read_bytes())) == (
        f"stdin: corrupt .npy header ({problem})"
    )
    with zipfile.ZipFile(tmp_path / "u.npz", "w") as archive:
        archive.writestr("unary.npy", path.read_bytes())
    assert _error(tmp_path / "u.npz") == f"{tmp_path / 'u.npz'}: corrupt .npz header ({problem})"


def _npy_v2(header: bytes) -> bytes:
    """Version 2.0 ``.npy`` bytes of ``header`` (padded to 64 bytes) and 64 bytes of data."""
    padded = header.ljust(-(-(len(header) + 13) // 64) * 64 - 13) + b"\n"
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(padded)) + padded + bytes(64)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (
            b"{'descr': '<f4', 'fortran_order': __import__('os'), 'shape': (4,), }",
            "malformed node or string on line 1",
        ),
        (
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }" + b" " * 20000,
            "Header info length (20084) is large and may not be safe to load securely",
        ),
        (b"{'descr': '<f4', 'shape': (4,), }", "Header does not contain the correct keys"),
    ],
)
def test_npy_headers_numpy_refuses_are_one_short_line(tmp_path, header, problem):
    # NumPy's reasons quote the parsed node (its address) or the whole header, and the one of
    # a long header takes three lines that suggest allow_pickle=True.
    path = tmp_path / "u.npy"
    path.write_bytes(_npy_v2(header))
    assert _error(path) == f"{path}: corrupt .npy header ({problem})"


def test_stdin_npy_declaring_more_data_than_it_holds_is_refused_before_allocating():
    data = npy_header((3, 100_000, 100_000)) + bytes(64)  # 120 GB declared
    assert _error("-", stdin=io.BytesIO(data)) == (
        "stdin: corrupt or truncated .npy data (the header declares 120000000000 bytes of "
        "array data, 64 follow)"
    )


def test_nan_inf_negative_and_integer_arrays(tmp_path):
    probs = _probs()
    probs[2, 3, 4] = np.nan
    message = _error(_npy(tmp_path, probs, "nan.npy"))
    assert "NaN" in message and "class 2, row 3, column 4" in message
    inf = _probs()
    inf[0, 0, 0] = np.inf
    assert "infinite" in _error(_npy(tmp_path, inf, "inf.npy"))
    negative = _probs()
    negative[1, 5, 6] = -0.25
    message = _error(_npy(tmp_path, negative, "neg.npy"), unary_type="prob")
    assert "negative probability -0.25 at class 1, row 5, column 6" in message
    too_big = _probs() * 3
    assert "above 1" in _error(_npy(tmp_path, too_big, "big.npy"), unary_type="prob")
    ints = np.zeros((C, H, W), np.int64)
    assert "float16, float32 or float64" in _error(_npy(tmp_path, ints, "int.npy"))


@pytest.mark.parametrize("unary_type", ["auto", "logit", "energy"])
def test_float64_values_beyond_float32_are_refused(tmp_path, unary_type):
    logits = np.log(_probs(dtype=np.float64)) * 1e39  # finite in float64, infinite in float32
    path = _npy(tmp_path, logits)
    message = _error(path, unary_type=unary_type)
    assert message.startswith(f"{path}: unary holds ") and "beyond the float32 range" in message
    assert "class 0, row 0, column 0" in message
    largest = _probs(dtype=np.float64)
    largest[0, 0, 0] = float(np.finfo(np.float32).max)
    assert read_unary(_npy(tmp_path, largest, "max.npy"), (H, W)).kind == "logit"


@pytest.mark.parametrize("shape", [(0, H, W), (H, W, 0), (1, 0, H, W)])
def test_a_unary_without_classes_is_refused(tmp_path, shape):
    path = _npy(tmp_path, np.zeros(shape, np.float32))
    assert f"{path}: unary shape" in _error(path) and "no classes" in _error(path)


def test_unknown_suffix_missing_file_and_class_count_check(tmp_path):
    assert "unknown unary format .txt" in _error(tmp_path / "u.txt")
    assert "no such file" in _error(tmp_path / "u.npy")
    path = _npy(tmp_path, _probs())
    assert "--num-classes is 4" in _error(path, num_classes=4)


def _label_png(tmp_path, labels: np.ndarray, name: str = "labels.png"):
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / name)
    return tmp_path / name


def test_label_image_unary_matches_unary_from_labels(tmp_path):
    labels = (np.arange(H * W).reshape(H, W) // 100 % 3).astype(np.uint8)
    labels[0, :5] = 255
    path = _label_png(tmp_path, labels)
    reading = read_unary(path, (H, W), label_confidence=0.6, ignore_label=255)
    assert (reading.layout, reading.kind) == ("labels", "labels")
    probs = np.exp(reading.logits)
    assert probs.shape == (3, H, W)
    known = labels != 255
    rows, cols = np.nonzero(known)
    np.testing.assert_allclose(probs[labels[rows, cols], rows, cols], 0.6, rtol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=0)[known], 1.0, rtol=1e-6)
    others = probs[:, known].copy()
    others[labels[known], np.arange(known.sum())] = 0
    np.testing.assert_allclose(others.max(axis=0), 0.2, rtol=1e-6)
    np.testing.assert_array_equal(reading.logits[:, ~known], 0.0)  # uniform


def test_options_of_the_other_kind_of_unary_are_ignored_with_a_warning(tmp_path):
    labels = (np.arange(H * W).reshape(H, W) % 3).astype(np.uint8)
    label_path = _label_png(tmp_path, labels)
    plain = read_unary(label_path, (H, W))
    assert plain.warnings == ()
    other = read_unary(label_path, (H, W), "logit", layout="HWC")
    np.testing.assert_array_equal(other.logits, plain.logits)
    assert other.warnings == (
        f"{label_path}: --unary-type and --layout apply only to an array unary (.npy, .npz); "
        "ignored",
    )
    array_path = _npy(tmp_path, _probs())
    assert read_unary(array_path, (H, W), label_confidence=0.7).warnings == ()
    assert read_unary(array_path, (H, W), ignore_label=255).warnings == (
        f"{array_path}: --ignore-label applies only to a label-image unary; ignored",
    )


def test_label_image_class_count_and_confidence_checks(tmp_path):
    labels = (np.arange(H * W).reshape(H, W) % 3).astype(np.uint8)
    path = _label_png(tmp_path, labels)
    assert read_unary(path, (H, W), num_classes=21).logits.shape == (21, H, W)
    assert "outside the 2 classes" in _error(path, num_classes=2)
    assert "above 1/C" in _error(path, label_confidence=0.3)
    assert f"the image is {H}×{W + 1}" in _error(path, (H, W + 1))
    zeros = _label_png(tmp_path, np.zeros((H, W)), "zeros.png")
    assert "holds only label 0: pass --num-classes" in _error(zeros)
    assert "--num-classes 1: a CRF needs at least 2 classes" in _error(zeros, num_classes=1)


_READ_UNDER_FD_LIMIT = """
import os, resource, sys
from convcrf_cli.errors import ConvCRFError
from convcrf_cli.unary import read_unary
open_now = len(os.listdir("/proc/self/fd")) - 1
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + int(sys.argv[2]), hard))
try:
    read_unary(sys.argv[1], (int(sys.argv[3]), int(sys.argv[4])))
    print("read")
except ConvCRFError as exc:
    print(type(exc).__name__, exc.exit_code, exc)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("spare", [0, 1])  # no descriptor left to open it, or to map it
def test_too_many_open_files_is_a_runtime_failure_not_a_corrupt_file(tmp_path, spare):
    path = _npy(tmp_path, _probs())
    done = subprocess.run(
        [sys.executable, "-c", _READ_UNDER_FD_LIMIT, str(path), str(spare), str(H), str(W)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == f"RuntimeFailure 1 {path}: cannot read: Too many open files\n", (
        done.stderr
    )


def test_read_errors_of_the_file_are_bad_input_and_of_the_machine_runtime_failures():
    cases = [
        (OSError(errno.EACCES, "Permission denied"), BadInputError, 2),
        (OSError(errno.ENOENT, "No such file or directory"), BadInputError, 2),
        (OSError("not a zip file"), BadInputError, 2),  # no errno: the contents
        (OSError(errno.EMFILE, "Too many open files"), RuntimeFailure, 1),
        (OSError(errno.EIO, "Input/output error"), RuntimeFailure, 1),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), RuntimeFailure, 1),
    ]
    for exc, kind, status in cases:
        error = unreadable("u.npy", exc)
        assert type(error) is kind and error.exit_code == status
        assert str(error) == f"u.npy: cannot read: {exc.strerror or exc}"
