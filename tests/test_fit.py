"""Learning CRF parameters: the library's ``fit`` and the ``convcrf fit`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cli_runner
from PIL import Image

from convcrf_cli import CRFParams, InputError, ParamsError, meanfield, refine
from convcrf_cli import unary as unary_module
from convcrf_cli.cli import main
from convcrf_cli.fit import Example, FitOptions, fit, split_examples
from convcrf_cli.fit_data import load_examples, pair_training_files
from convcrf_cli.pipeline import UnaryOptions
from convcrf_cli.synthetic import synthetic_sample, write_dataset
from convcrf_cli.torch import ConvCRF
from convcrf_cli.unary import LABEL_IMAGE_SUFFIXES, read_unary

CLASSES = 4
POOR_START = CRFParams(filter_size=7, blur=4, pos_sdims=3.0 * 4, col_schan=13.0 * 4)
"""Feature scales four times the defaults (too wide); a fixed, cheap window for speed."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _examples(count, size, seed=0):
    examples = []
    for index in range(count):
        image, labels, probs = synthetic_sample(seed, index, size, size, CLASSES)
        logits = np.log(np.maximum(probs, 1e-6))
        examples.append(Example(f"s{index}", image, logits, labels.astype(np.int64)))
    return examples


def test_fit_raises_held_out_miou_from_poor_start():
    result = fit(_examples(16, 96), POOR_START, FitOptions(epochs=10, seed=0))
    assert len(result.val_names) == 4 and len(result.train_names) == 12
    assert not set(result.val_names) & set(result.train_names)
    assert result.miou_after > result.miou_before + 0.04, result
    assert result.miou_after > result.miou_unary + 0.15
    assert np.mean(result.losses[-3:]) < 0.5 * np.mean(result.losses[:3])
    learned = result.module.to_params()
    assert learned.col_schan < POOR_START.col_schan  # the too-wide colour scale shrinks
    fixed = ("filter_size", "blur", "iterations", "unary_weight", "init")
    assert all(getattr(learned, name) == getattr(POOR_START, name) for name in fixed)


def test_fit_is_deterministic_for_a_seed():
    examples = _examples(4, 40)
    options = FitOptions(epochs=2, crop_size=24, batch_size=2, seed=3)
    first, second = fit(examples, POOR_START, options), fit(examples, POOR_START, options)
    assert first.losses == second.losses
    assert first.module.to_dict() == second.module.to_dict()
    other = fit(examples, POOR_START, FitOptions(epochs=2, crop_size=24, batch_size=2, seed=4))
    assert other.losses != first.losses


def test_first_loss_is_cross_entropy_of_refined_output_over_labelled_pixels():
    (example,) = _examples(1, 32)
    labels = example.labels.copy()
    labels[:10] = 255  # ignored rows
    example = Example("a", example.image, example.logits, labels)
    params = CRFParams(filter_size=5, blur=2)
    result = fit([example], params, FitOptions(epochs=1, val_fraction=0, crop_size=32))
    scores = refine(example.image, example.logits, params, device="cpu").astype(np.float64)
    log_probs = scores - scores.max(0) - np.log(np.exp(scores - scores.max(0)).sum(0))
    keep = labels != 255
    rows, cols = np.nonzero(keep)
    expected = -log_probs[labels[keep], rows, cols].mean()
    assert result.losses[0] == pytest.approx(expected, rel=1e-4)
    assert result.miou_before is None and result.miou_after is None


def test_learn_c_and_t_trains_the_matrices():
    result = fit(_examples(4, 40), POOR_START, FitOptions(epochs=2, crop_size=32, learn="C,T"))
    module = result.module
    assert module.compat_transform.abs().sum() > 0
    assert not np.allclose(module.feature_transform.detach().numpy(), np.eye(3))
    assert module.to_params() == POOR_START.replace(
        pos_sdims=module.to_params().pos_sdims, col_schan=module.to_params().col_schan
    )
    assert module.to_params().pos_sdims == pytest.approx(POOR_START.pos_sdims, rel=1e-6)


def test_split_examples_holds_out_at_least_one_and_keeps_one_for_training():
    examples = _examples(3, 8)
    train, val = split_examples(examples, 0.1, seed=0)
    assert len(train) == 2 and len(val) == 1
    with pytest.raises(InputError, match="none for training"):
        split_examples(examples[:1], 0.5, seed=0)


def test_inconsistent_examples_are_rejected():
    a, b = _examples(2, 16)
    with pytest.raises(InputError, match="b: 2 classes"):
        fit([a, Example("b", b.image, b.logits[:2], b.labels)], CRFParams(), FitOptions())
    bad = b.labels.copy()
    bad[0, 0] = 7
    with pytest.raises(InputError, match=r"b: label values must lie in \[0, 4\)"):
        fit([a, Example("b", b.image, b.logits, bad)], CRFParams(), FitOptions())
    with pytest.raises(InputError, match=r"b: expected image \[H,W,F\] or \[H,W\]"):
        fit([a, Example("b", b.image[0, :, 0], b.logits, b.labels)], CRFParams(), FitOptions())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"learn": "compat,X"}, "X"),
        ({"epochs": 1.5}, "epochs must be an integer, got 1.5"),
        ({"epochs": True}, "epochs must be an integer, got True"),
        ({"epochs": "2"}, "epochs must be an integer, got '2'"),
        ({"crop_size": 12.5}, "crop_size must be an integer"),
        ({"crop_size": 0}, "crop_size must be >= 1"),
        ({"batch_size": 1.5}, "batch_size must be an integer"),
        ({"batch_size": np.int64(0)}, "batch_size must be >= 1"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"ignore_label": None}, "ignore_label must be an integer, got None"),
        ({"ignore_label": np.float64(255)}, "ignore_label must be an integer"),
        ({"lr": "0.1"}, "lr must be a number, got '0.1'"),
        ({"lr": True}, "lr must be a number"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"lr": np.float32("inf")}, "lr must be a positive finite number"),
        ({"val_fraction": "0.1"}, "val_fraction must be a number"),
    ],
)
def test_fit_options_are_validated(changes, message):
    with pytest.raises(ParamsError, match=message):
        FitOptions(**changes)


def test_fit_options_convert_numpy_numbers():
    options = FitOptions(
        epochs=np.int64(1), lr=np.float32(0.5), seed=np.uint8(3), crop_size=np.int32(6),
        batch_size=np.int16(2), ignore_label=np.int64(-1), val_fraction=np.float64(0),
    )  # fmt: skip
    for name, kind in (("epochs", int), ("seed", int), ("crop_size", int), ("lr", float)):
        assert type(getattr(options, name)) is kind, name
    assert (options.epochs, options.lr, options.seed, options.ignore_label) == (1, 0.5, 3, -1)
    (example,) = _examples(1, 8)
    result = fit([example], CRFParams(filter_size=3, iterations=1), options)
    assert len(result.losses) == 1


def _subprocess(*args, cwd):
    command = [sys.executable, "-m", "convcrf_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_torch_thread fixture
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)


def _in_process(*args):
    return cli_runner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root, count=6, height=48, width=48, num_classes=CLASSES, seed=1)
    return root


def test_cli_fit_writes_params_that_refine_reads(dataset, tmp_path):
    learned = tmp_path / "learned.json"
    run = _subprocess(
        "fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned,
        "--epochs", "2", "-k", "5", "--pos-sdims", "12", "--col-schan", "52", "--device", "cpu",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "held-out mIoU (2 images): unary" in run.stdout and "after" in run.stdout
    params = CRFParams.load(learned)
    assert params.filter_size == 5 and params.col_schan != 52.0
    name = "synth_00000"
    out = tmp_path / "labels.png"
    run = _subprocess(
        "refine", dataset / "images" / f"{name}.png", dataset / "unaries" / f"{name}.npy",
        "-o", out, "--params", learned, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    image = np.asarray(Image.open(dataset / "images" / f"{name}.png"))
    unary = np.load(dataset / "unaries" / f"{name}.npy")
    expected = refine(image, np.log(np.maximum(unary, 1e-6)), params).argmax(0)
    assert (np.asarray(Image.open(out)) == expected).mean() > 0.999


def test_cli_fit_with_compat_transform_is_refused_by_refine(dataset, tmp_path):
    learned = tmp_path / "learned_c.json"
    run = _in_process(
        "fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned,
        "--epochs", "1", "-k", "3", "--learn", "compat,C", "--crop-size", "32", "--device", "cpu",
    )  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert np.asarray(json.loads(learned.read_text())["compat_transform"]).shape == (4, 4)
    assert ConvCRF.load(learned).num_classes == CLASSES
    name = "synth_00000"
    out = tmp_path / "out.png"
    run = _in_process(
        "refine", dataset / "images" / f"{name}.png", dataset / "unaries" / f"{name}.npy",
        "-o", out, "--params", learned,
    )  # fmt: skip
    assert run.exit_code == 2
    assert "compat_transform" in run.stderr and "ConvCRF.load" in run.stderr
    assert not out.exists()


def test_cli_fit_bad_label_map_fails_without_output(dataset, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in (dataset / "labels").iterdir():
        (labels / path.name).write_bytes(path.read_bytes())
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(labels / "synth_00003.png")
    learned = tmp_path / "learned.json"
    run = _in_process("fit", dataset / "images", dataset / "unaries", labels, "-o", learned)
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {labels / 'synth_00003.png'}: label map is 10×10 but the image is 48×48\n"
    )
    assert not learned.exists()
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(labels / "synth_00003.png")
    run = _in_process("fit", dataset / "images", dataset / "unaries", labels, "-o", learned)
    assert run.exit_code == 2 and "label values must lie in [0, 4)" in run.stderr
    (labels / "synth_00003.png").unlink()
    run = _in_process("fit", dataset / "images", dataset / "unaries", labels, "-o", learned)
    assert run.exit_code == 2 and f"no label map in {labels} (synth_00003.png, synth_00003.tif" in (
        run.stderr
    )
    assert not learned.exists()


def test_cli_fit_unary_with_other_class_count_is_named(dataset, tmp_path):
    unaries = tmp_path / "unaries"
    unaries.mkdir()
    for path in (dataset / "unaries").iterdir():
        (unaries / path.name).write_bytes(path.read_bytes())
    three = np.full((3, 48, 48), 1 / 3, np.float32)
    np.save(unaries / "synth_00002.npy", three)
    learned = tmp_path / "learned.json"
    run = _in_process("fit", dataset / "images", unaries, dataset / "labels", "-o", learned)
    assert run.exit_code == 2
    assert run.stderr.startswith(f"convcrf: error: {unaries / 'synth_00002.npy'}: unary has 3")
    assert not learned.exists()


def test_cli_fit_creates_missing_output_directory(dataset, tmp_path):
    learned = tmp_path / "missing" / "deeper" / "learned.json"
    run = _in_process(
        "fit",
        dataset / "images",
        dataset / "unaries",
        dataset / "labels",
        "-o",
        learned,
        "--epochs",
        "1",
    )
    assert run.exit_code == 0, run.stderr
    assert CRFParams.from_dict(json.loads(learned.read_text())) is not None


def test_cli_fit_warns_of_unaries_and_labels_without_an_image(dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((dataset / "images").iterdir())[1:]:
        (images / path.name).write_bytes(path.read_bytes())
    learned = tmp_path / "learned.json"
    run = _in_process(
        "fit", images, dataset / "unaries", dataset / "labels", "-o", learned, "--epochs", "1"
    )
    assert run.exit_code == 0, run.stderr
    unary, labels = dataset / "unaries" / "synth_00000.npy", dataset / "labels" / "synth_00000.png"
    assert run.stderr.splitlines()[:2] == [
        f"convcrf: warning: 1 unary file(s) without an image, not used: {unary}",
        f"convcrf: warning: 1 label map file(s) without an image, not used: {labels}",
    ]


def test_cli_fit_refuses_uncreatable_output_directory_before_training(dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    learned = blocker / "learned.json"
    run = _in_process(
        "fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned
    )
    assert run.exit_code == 2
    assert run.stderr == (f"convcrf: error: {learned}: directory {blocker} is not a directory\n")


def test_cli_fit_input_directories_that_cannot_be_looked_at_are_one_line(dataset, tmp_path):
    # Path.exists raised OSError for a name too long before Python 3.12 (a traceback).
    long = tmp_path / ("x" * 300)
    run = _in_process("fit", dataset / "images", long, dataset / "labels", "-o", tmp_path / "o")
    assert run.exit_code == 2
    assert run.stderr == f"convcrf: error: {long}: cannot read: File name too long\n"


def test_cli_fit_refuses_a_float_image_that_overflows_when_pooled_before_training(tmp_path):
    # The NaN loss it gave was "training diverged ... lower the learning rate", status 1.
    for sub in ("images", "unaries", "labels"):
        (tmp_path / sub).mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((12, 12), 2e38, np.float32)).save(
            tmp_path / "images" / f"{name}.tif"
        )
        Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "labels" / f"{name}.png")
        np.save(tmp_path / "unaries" / f"{name}.npy", np.full((2, 12, 12), 0.5, np.float32))
    dirs = [tmp_path / sub for sub in ("images", "unaries", "labels")]
    run = _in_process("fit", *dirs, "-o", tmp_path / "learned.json", "--device", "cpu")
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {tmp_path / 'images' / 'a.tif'}: values summed over a cell of --blur 3 "
        "reach 1.8e+39, beyond float32 (±3.4e+38); scale the image down, and --col-schan with it\n"
    )
    assert not (tmp_path / "learned.json").exists()


def test_cli_fit_refuses_stdout_as_output(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old code wrote a file named "-" here
    dirs = (dataset / "images", dataset / "unaries", dataset / "labels")
    run = _in_process("fit", *dirs, "-o", "-", "--epochs", "1", "--device", "cpu")
    assert run.exit_code == 2
    assert run.stderr == (
        "convcrf: error: -: the learned parameters are written to a file, not stdout (which "
        "carries the summary); give a file name\n"
    )
    assert run.stdout == "" and not list(tmp_path.iterdir())


def _tag_orientation(path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.open(path).save(path, exif=exif)


def test_cli_fit_uses_images_in_their_exif_orientation_as_refine_does(tmp_path):
    write_dataset(tmp_path, count=3, height=40, width=48, num_classes=CLASSES, seed=1)
    dirs = (tmp_path / "images", tmp_path / "unaries", tmp_path / "labels")
    common = ("-o", tmp_path / "learned.json", "--epochs", "1", "-k", "3", "--device", "cpu")
    turned = tmp_path / "images" / "synth_00000.png"
    _tag_orientation(turned, 6)  # 90°: the stored-size unary and labels no longer fit
    run = _in_process("fit", *dirs, *common)
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {tmp_path / 'unaries' / 'synth_00000.npy'}: unary fits {turned} as "
        "stored (40×48), not as used (48×40, EXIF orientation 6 (rotated 90° clockwise) "
        "applied); pass --exif-orientation ignore if the segmenter saw it that way\n"
    )
    run = _in_process("fit", *dirs, *common, "--exif-orientation", "ignore")
    assert run.exit_code == 0, run.stderr
    _tag_orientation(turned, 3)  # a half turn: the sizes cannot tell, so it is said
    run = _in_process("fit", *dirs, *common)
    assert run.exit_code == 0, run.stderr
    assert run.stderr == (
        f"convcrf: warning: {turned}: EXIF orientation 3 (rotated 180°) applied; the unary "
        "must be in that orientation (--exif-orientation ignore uses the pixels as stored)\n"
    )


def test_cli_fit_explains_a_label_map_that_fits_the_other_exif_orientation(tmp_path):
    write_dataset(tmp_path, count=3, height=40, width=48, num_classes=CLASSES, seed=1)
    dirs = (tmp_path / "images", tmp_path / "unaries", tmp_path / "labels")
    common = ("-o", tmp_path / "learned.json", "--epochs", "1", "-k", "3", "--device", "cpu")
    turned = tmp_path / "images" / "synth_00000.png"
    _tag_orientation(turned, 6)  # 90° clockwise: used as 48×40
    unary = tmp_path / "unaries" / "synth_00000.npy"
    np.save(unary, np.ascontiguousarray(np.rot90(np.load(unary), -1, axes=(1, 2))))
    labels = tmp_path / "labels" / "synth_00000.png"
    run = _in_process("fit", *dirs, *common)  # the unary is turned, the label map is not
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {labels}: label map fits {turned} as stored (40×48), not as used "
        "(48×40, EXIF orientation 6 (rotated 90° clockwise) applied); label maps are used as "
        "stored, so it must be turned to match the unary\n"
    )


def test_cli_fit_resumes_from_a_file_with_its_compat_matrix(dataset, tmp_path):
    common = ("--epochs", "1", "-k", "3", "--crop-size", "32", "--device", "cpu", "--seed", "5")
    dirs = (dataset / "images", dataset / "unaries", dataset / "labels")
    first = tmp_path / "first.json"
    run = _in_process("fit", *dirs, "-o", first, "--learn", "compat,C", *common)
    assert run.exit_code == 0, run.stderr
    second = tmp_path / "second.json"
    run_again = _in_process(
        "fit", *dirs, "-o", second, "--learn", "compat,C", "--params", first, *common
    )
    assert run_again.exit_code == 0, run_again.stderr
    # same seed, same held-out split: the second run starts where the first one ended
    after_first = run.stdout.split("after ")[1].split()[0]
    before_second = run_again.stdout.split("CRF before ")[1].split(",")[0]
    assert before_second == after_first
    start = np.asarray(json.loads(first.read_text())["compat_transform"])
    resumed = np.asarray(json.loads(second.read_text())["compat_transform"])
    assert resumed.shape == start.shape == (CLASSES, CLASSES)
    assert not np.array_equal(resumed, start)  # trained further, from the loaded matrix
    third = tmp_path / "third.json"  # without --learn: the file's C goes on training too
    assert _in_process("fit", *dirs, "-o", third, "--params", first, *common).exit_code == 0
    assert not np.array_equal(np.asarray(json.loads(third.read_text())["compat_transform"]), start)
    frozen = tmp_path / "frozen.json"  # an explicit --learn without C keeps it as it was
    run_frozen = _in_process("fit", *dirs, "-o", frozen, "--params", first, "--learn", "compat",
                             *common)  # fmt: skip
    assert run_frozen.exit_code == 0
    assert np.array_equal(np.asarray(json.loads(frozen.read_text())["compat_transform"]), start)


def test_cli_fit_from_a_file_with_null_matrices_learns_no_matrix(dataset, tmp_path):
    start = tmp_path / "start.json"
    start.write_text(json.dumps({**CRFParams().to_dict(), "compat_transform": None}))
    learned = tmp_path / "learned.json"
    run = _in_process(
        "fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned,
        "--params", start, "--epochs", "1", "-k", "3", "--crop-size", "32", "--device", "cpu",
    )  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert "compat_transform" not in json.loads(learned.read_text())


def test_cli_fit_start_matrix_of_other_class_count_names_the_file(dataset, tmp_path):
    start = tmp_path / "start.json"
    start.write_text(json.dumps({**CRFParams().to_dict(), "compat_transform": np.eye(3).tolist()}))
    learned = tmp_path / "learned.json"
    run = _in_process(
        "fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned,
        "--params", start, "--learn", "compat,C",
    )  # fmt: skip
    assert run.exit_code == 2
    assert run.stderr.startswith(f"convcrf: error: {start}: compat_transform is 3x3")
    assert "the data have 4 classes" in run.stderr and not learned.exists()


def test_cli_fit_start_matrix_from_stdin_names_stdin(dataset, tmp_path):
    start = json.dumps({**CRFParams().to_dict(), "compat_transform": np.eye(3).tolist()})
    learned = tmp_path / "learned.json"
    args = ["fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned]
    run = cli_runner().invoke(main, [str(arg) for arg in (*args, "--params", "-")], input=start)
    assert run.exit_code == 2
    assert run.stderr.startswith("convcrf: error: stdin: compat_transform is 3x3")
    assert not learned.exists()


@pytest.mark.parametrize("lr", ["1e6", "1e37"])  # 1e37: Adam's step overflows float32
def test_cli_fit_that_diverges_exits_1_without_output(dataset, tmp_path, lr):
    learned = tmp_path / "learned.json"
    run = _in_process(
        "fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned,
        "--epochs", "2", "-k", "3", "--crop-size", "24", "--lr", lr,
    )  # fmt: skip
    assert run.exit_code == 1
    assert run.stderr.startswith("convcrf: error: training diverged at step ")
    assert run.stderr.endswith("; lower the learning rate (--lr)\n")
    assert len(run.stderr.splitlines()) == 1 and not learned.exists()


def test_cli_fit_out_of_cpu_memory_is_one_line_and_status_1(dataset, tmp_path, monkeypatch):
    # torch's CPU allocator raises RuntimeError, e.g. for -k 100001 (3.5 TB): a traceback.
    def crf_kernel(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 3520070400352 bytes. Error code 12"
        )

    monkeypatch.setattr(meanfield, "crf_kernel", crf_kernel)
    learned = tmp_path / "learned.json"
    run = _in_process(
        "fit", dataset / "images", dataset / "unaries", dataset / "labels", "-o", learned,
        "--epochs", "1", "--device", "cpu",
    )  # fmt: skip
    assert run.exit_code == 1, run.stderr
    assert run.stderr.splitlines() == [
        "convcrf: error: out of memory: the image is too large for this machine (try a larger "
        "--blur or a smaller image)"
    ]
    assert not learned.exists()


def test_ctrl_c_stops_training_at_once_without_output(dataset, tmp_path):
    # Training runs with denormals flushed (in the calling thread's team, or in a worker thread
    # of its own); the interrupted command must not wait for it to finish its 100000 epochs.
    command = [sys.executable, "-m", "convcrf_cli", "fit", dataset / "images",
               dataset / "unaries", dataset / "labels", "--epochs", "100000", "--crop-size",
               "24", "-v", "-o", tmp_path / "p.json"]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True)
    assert process.stderr.readline().startswith("synth_")  # the files are read: training next
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    try:
        _, rest = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("still training a minute after Ctrl-C")
    assert process.returncode == 130
    assert rest.endswith("convcrf: error: interrupted\n") and "Traceback" not in rest
    assert not (tmp_path / "p.json").exists()


def test_cli_fit_needs_the_layout_of_an_ambiguous_unary_and_takes_it(tmp_path):
    write_dataset(tmp_path, count=3, height=8, width=8, num_classes=8, seed=1)  # C = H = W
    images, chw, labels = tmp_path / "images", tmp_path / "unaries", tmp_path / "labels"
    hwc = tmp_path / "unaries_hwc"
    hwc.mkdir()
    for path in chw.iterdir():
        np.save(hwc / path.name, np.ascontiguousarray(np.moveaxis(np.load(path), 0, -1)))
    common = ("--epochs", "2", "-k", "3", "--val-fraction", "0", "--device", "cpu")
    run = _in_process("fit", images, chw, labels, "-o", tmp_path / "auto.json", *common)
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {chw / 'synth_00000.npy'}: unary shape (8, 8, 8) fits the 8×8 image "
        "both as CHW (C=8) and as HWC (C=8); name the layout (--layout CHW or --layout HWC)\n"
    )
    learned = {}
    for unaries, layout in ((chw, "CHW"), (hwc, "HWC"), (hwc, "hwc"), (chw, "HWC")):
        out = tmp_path / f"{unaries.name}_{layout}.json"
        run = _in_process("fit", images, unaries, labels, "-o", out, "--layout", layout, *common)
        assert run.exit_code == 0, run.stderr
        learned[unaries.name, layout] = out.read_bytes()
    assert learned["unaries", "CHW"] == learned["unaries_hwc", "HWC"]  # the same data
    assert learned["unaries_hwc", "hwc"] == learned["unaries_hwc", "HWC"]
    assert learned["unaries", "HWC"] != learned["unaries", "CHW"]  # transposed: other data


def test_cli_fit_resizes_low_resolution_unaries_as_refine_does(dataset, tmp_path):
    small, resized = tmp_path / "small", tmp_path / "resized"
    small.mkdir()
    resized.mkdir()
    for path in (dataset / "unaries").iterdir():
        np.save(small / path.name, np.load(path)[:, ::4, ::4])  # 12×12 for 48×48
        logits = read_unary(small / path.name, (48, 48), resize="bilinear").logits
        np.save(resized / path.name, logits)
    common = ("--epochs", "1", "-k", "3", "--crop-size", "32", "--device", "cpu")
    images, labels = dataset / "images", dataset / "labels"
    refused = _in_process("fit", images, small, labels, "-o", tmp_path / "no.json", *common)
    assert refused.exit_code == 2 and "--resize-unary bilinear" in refused.stderr
    from_small = tmp_path / "from_small.json"
    run = _in_process("fit", images, small, labels, "-o", from_small, "--resize-unary",
                      "bilinear", "-v", *common)  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert (
        f"convcrf: note: {small / 'synth_00000.npy'}: unary resized from 12×12 to 48×48 "
        "(bilinear, on the logits)" in run.stderr
    )
    from_resized = tmp_path / "from_resized.json"
    run = _in_process("fit", images, resized, labels, "-o", from_resized, "--unary-type",
                      "logit", *common)  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert from_small.read_bytes() == from_resized.read_bytes()


def _label_unaries(dataset, directory):
    """Write the argmax of each unary of ``dataset`` as a label image in ``directory``, the
    first row 255 (unsure), the first image's pixel (1, 0) the last class; return the label
    maps ``{name: [H,W] uint8}``."""
    directory.mkdir()
    maps = {}
    for index, path in enumerate(sorted((dataset / "unaries").glob("*.npy"))):
        labels = np.load(path).argmax(0).astype(np.uint8)
        labels[0] = 255
        if index == 0:
            labels[1, 0] = CLASSES - 1
        Image.fromarray(labels).save(directory / f"{path.stem}.png")
        maps[path.stem] = labels
    return maps


def test_fit_reads_a_label_image_unary_as_refine_does(dataset, tmp_path, monkeypatch):
    unaries = tmp_path / "label_unaries"
    maps = _label_unaries(dataset, unaries)
    reading = UnaryOptions(label_confidence=0.8, ignore_label=255, num_classes=CLASSES)
    files, _ = pair_training_files(dataset / "images", unaries, dataset / "labels")
    examples = load_examples(files, reading, blur=3)
    converted = []  # what refine's loader gives, caught on its way to the CRF
    real = unary_module.convert_unary

    def convert_unary(*args, **kwargs):
        converted.append(real(*args, **kwargs))
        return converted[-1]

    monkeypatch.setattr(unary_module, "convert_unary", convert_unary)
    for example, entry in zip(examples, files, strict=True):
        run = _in_process(
            "refine", entry.image, entry.unary, "-o", tmp_path / "out.png", "-n", "1",
            "--num-classes", CLASSES, "--label-confidence", "0.8", "--ignore-label", "255",
        )  # fmt: skip
        assert run.exit_code == 0, run.stderr
        assert converted[-1].kind == "labels"
        np.testing.assert_array_equal(example.logits, converted[-1].logits)
        assert example.logits.shape == (CLASSES, 48, 48)
        assert (example.logits[:, 0] == 0).all()  # the 255 row: uniform
        assert (example.logits[:, 1:].argmax(0) == maps[entry.key][1:]).all()


def test_cli_fit_on_label_image_unaries_learns_as_on_their_logits(dataset, tmp_path):
    unaries = tmp_path / "label_unaries"
    _label_unaries(dataset, unaries)
    logits = tmp_path / "logits"
    logits.mkdir()
    for path in unaries.iterdir():
        read = read_unary(path, (48, 48), label_confidence=0.8, ignore_label=255,
                          num_classes=CLASSES)  # fmt: skip
        np.save(logits / f"{path.stem}.npy", read.logits)
    common = ("--epochs", "1", "-k", "3", "--crop-size", "32", "--device", "cpu")
    images, labels = dataset / "images", dataset / "labels"
    from_labels, from_logits = tmp_path / "from_labels.json", tmp_path / "from_logits.json"
    run = _in_process("fit", images, unaries, labels, "-o", from_labels, "--num-classes", CLASSES,
                      "--label-confidence", "0.8", "-v", *common)  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert f"{unaries / 'synth_00000.png'} (labels, 4 classes)" in run.stderr
    assert "warning" not in run.stderr
    assert "held-out mIoU (2 images): unary" in run.stdout
    assert CRFParams.load(from_labels).filter_size == 3
    run = _in_process("fit", images, logits, labels, "-o", from_logits, "--unary-type", "logit",
                      *common)  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert from_labels.read_bytes() == from_logits.read_bytes()
    # --ignore-label is the unary's unsure label too: with another one, 255 is a label
    run = _in_process("fit", images, unaries, labels, "-o", tmp_path / "other.json",
                      "--num-classes", CLASSES, "--ignore-label", "254", *common)  # fmt: skip
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {unaries / 'synth_00000.png'}: label 255 is outside the 4 classes of "
        "--num-classes\n"
    )


def test_cli_fit_label_image_unaries_of_other_class_counts_are_an_error(dataset, tmp_path):
    unaries = tmp_path / "label_unaries"
    maps = _label_unaries(dataset, unaries)  # the first holds label 3: 4 classes
    first, second = unaries / "synth_00000.png", unaries / "synth_00001.png"
    Image.fromarray(np.minimum(maps["synth_00001"], 2)).save(second)  # 3 classes
    dirs = (dataset / "images", unaries, dataset / "labels")
    learned = tmp_path / "learned.json"
    hint = "; a label-image unary has its largest label + 1 classes: pass --num-classes\n"
    run = _in_process("fit", *dirs, "-o", learned)
    assert run.exit_code == 2
    assert run.stderr == f"convcrf: error: {second}: unary has 3 classes, {first} has 4" + hint
    np.save(unaries / "synth_00001.npy", np.full((3, 48, 48), 1 / 3, np.float32))
    second.unlink()  # an array of 3 classes after a label image of 4
    run = _in_process("fit", *dirs, "-o", learned)
    assert run.exit_code == 2
    array = unaries / "synth_00001.npy"
    assert run.stderr == f"convcrf: error: {array}: unary has 3 classes, {first} has 4" + hint
    for name, labels in maps.items():  # all of 3 classes; the label maps hold 4
        Image.fromarray(np.minimum(labels, 2)).save(unaries / f"{name}.png")
    array.unlink()
    run = _in_process("fit", *dirs, "-o", learned)
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {dataset / 'labels' / 'synth_00000.png'}: label values must lie in "
        "[0, 3) or equal the ignore label 255; found 0..3" + hint
    )
    assert not learned.exists()


def test_cli_fit_pairing_keeps_unaries_and_label_maps_apart(dataset, tmp_path):
    images, labels = dataset / "images", dataset / "labels"
    common = ("--epochs", "1", "-k", "3", "--crop-size", "32", "--device", "cpu", "-v")
    shared = tmp_path / "shared"  # arrays and the label maps in one directory
    shared.mkdir()
    for path in [*(dataset / "unaries").iterdir(), *labels.iterdir()]:
        (shared / path.name).write_bytes(path.read_bytes())
    run = _in_process("fit", images, shared, shared, "-o", tmp_path / "shared.json", *common)
    assert run.exit_code == 0, run.stderr
    assert f"{shared / 'synth_00000.npy'} (prob, 4 classes) + {shared / 'synth_00000.png'}" in (
        run.stderr
    )
    run = _in_process("fit", images, labels, labels, "-o", tmp_path / "same.json")
    assert run.exit_code == 2
    assert run.stderr == (
        f"convcrf: error: {images / 'synth_00000.png'}: no unary in {labels} (synth_00000.npy, "
        "synth_00000.npz); it is also the labels directory, so only its .npy and .npz files are "
        "unaries\n"
    )
    both = tmp_path / "both"  # an array and a label image of one name: the array is the unary
    _label_unaries(dataset, both)
    np.save(both / "synth_00003.npy", np.full((4, 48, 48), 0.25, np.float32))
    run = _in_process("fit", images, both, labels, "-o", tmp_path / "both.json", *common)
    assert run.exit_code == 0, run.stderr
    assert f"{both / 'synth_00003.npy'} (prob, 4 classes) + " in run.stderr
    assert f"{both / 'synth_00002.png'} (labels, 4 classes) + " in run.stderr
    assert f"{both / 'synth_00003.png'}" not in run.stderr
    (both / "synth_00003.npy").unlink()
    (both / "synth_00004.png").unlink()
    run = _in_process("fit", images, both, labels, "-o", tmp_path / "both.json")
    assert run.exit_code == 2
    names = ", ".join(f"synth_00004{suffix}" for suffix in (".npy", ".npz", *LABEL_IMAGE_SUFFIXES))
    assert run.stderr == (
        f"convcrf: error: {images / 'synth_00004.png'}: no unary in {both} ({names})\n"
    )
