"""The synthetic task: scenes, noisy unaries, dataset files, and the CRF's gain on them."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_runner
from PIL import Image

from convcrf_cli import CRFParams, refine
from convcrf_cli.cli import main
from convcrf_cli.metrics import confusion_matrix, iou_per_class
from convcrf_cli.synthetic import noisy_unary, random_scene, synthetic_sample, write_dataset
from convcrf_cli.unary import PROB_EPS


@pytest.mark.parametrize("size, classes", [((64, 80), 21), ((33, 17), 2), ((40, 40), 1)])
def test_scene_sizes_types_and_classes(size, classes):
    rng = np.random.default_rng(1)
    image, labels = random_scene(rng, *size, classes)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert labels.shape == size and labels.dtype == np.uint8
    assert labels.max() < classes


def test_scenes_have_several_regions_with_visible_boundaries():
    for index in range(5):
        image, labels = random_scene(np.random.default_rng(index), 96, 128, 21)
        assert len(np.unique(labels)) >= 2
        # Where the label changes between horizontal neighbours, the colour changes clearly
        # more on average than inside regions.
        step = np.abs(np.diff(image.astype(float), axis=1)).sum(axis=-1)
        boundary = np.diff(labels.astype(int), axis=1) != 0
        assert step[boundary].mean() > 4 * step[~boundary].mean()


def test_unary_is_a_distribution_with_argmax_clearly_below_perfect():
    for index in range(3):
        _, labels, unary = synthetic_sample(0, index, 96, 128, 21)
        assert unary.shape == (21, 96, 128) and unary.dtype == np.float32
        assert unary.min() >= 0
        np.testing.assert_allclose(unary.sum(axis=0), 1.0, atol=1e-5)
        accuracy = (unary.argmax(axis=0) == labels).mean()
        assert 0.6 < accuracy < 0.93


def test_noise_replaces_the_requested_fraction_of_coarse_cells():
    # All-background labels: a coarse cell disagrees only where it was replaced by another
    # class. Pixels 8j+4 take 94% of each axis' weight from cell j, so they show its class.
    classes, cells = 50, 64
    labels = np.zeros((8 * cells, 8 * cells), dtype=np.uint8)
    for fraction in (0.2, 0.5):
        unary = noisy_unary(labels, classes, np.random.default_rng(2), noise_fraction=fraction)
        centres = unary[:, 4::8, 4::8].argmax(axis=0)
        assert centres.shape == (cells, cells)
        expected = fraction * (1 - 1 / classes)
        assert abs((centres != 0).mean() - expected) < 0.01
    clean = noisy_unary(labels, classes, np.random.default_rng(2), noise_fraction=0.0)
    np.testing.assert_allclose(clean[0], 1.0, atol=1e-6)


def test_unary_is_blocky_at_one_eighth_resolution():
    # A vertical boundary at column 21 (not on the 8-pixel grid) becomes a ramp: the unary
    # cannot place it, and both classes mix over several pixels.
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[:, 21:] = 1
    unary = noisy_unary(labels, 2, np.random.default_rng(0), noise_fraction=0.0)
    row = unary[1, 32]
    mixed = np.flatnonzero((row > 0.05) & (row < 0.95))
    assert len(mixed) >= 6
    assert row[0] < 0.01 and row[-1] > 0.99


def test_refinement_with_default_parameters_raises_miou_well_above_the_unary():
    classes = 21
    unary_counts = np.zeros((classes, classes), dtype=np.int64)
    refined_counts = np.zeros_like(unary_counts)
    for index in range(4):
        image, labels, unary = synthetic_sample(7, index, 96, 128, classes)
        scores = refine(image, np.log(np.maximum(unary, PROB_EPS)), CRFParams())
        unary_counts += confusion_matrix(unary.argmax(axis=0), labels, classes)
        refined_counts += confusion_matrix(scores.argmax(axis=0), labels, classes)
    unary_miou = np.nanmean(iou_per_class(unary_counts))
    refined_miou = np.nanmean(iou_per_class(refined_counts))
    assert refined_miou > unary_miou + 0.15, (unary_miou, refined_miou)
    assert np.trace(refined_counts) > np.trace(unary_counts)


def test_write_dataset_files_and_reproducibility(tmp_path):
    names = write_dataset(tmp_path / "a", 2, 24, 40, 5, seed=3)
    assert names == ["synth_00000", "synth_00001"]
    for name in names:
        image = np.asarray(Image.open(tmp_path / "a" / "images" / f"{name}.png"))
        label_png = Image.open(tmp_path / "a" / "labels" / f"{name}.png")
        assert label_png.mode == "P"
        labels = np.asarray(label_png)
        unary = np.load(tmp_path / "a" / "unaries" / f"{name}.npy")
        assert image.shape == (24, 40, 3) and labels.shape == (24, 40) and labels.max() < 5
        assert unary.shape == (5, 24, 40) and unary.dtype == np.float32
    # Sample 1 of seed 3 is the same whatever the count; a different seed gives another.
    write_dataset(tmp_path / "b", 3, 24, 40, 5, seed=3)
    write_dataset(tmp_path / "c", 2, 24, 40, 5, seed=4)
    first = (tmp_path / "a" / "images" / "synth_00001.png").read_bytes()
    assert first == (tmp_path / "b" / "images" / "synth_00001.png").read_bytes()
    assert first != (tmp_path / "c" / "images" / "synth_00001.png").read_bytes()


def test_synth_command(tmp_path):
    runner = cli_runner()
    result = runner.invoke(
        main, ["synth", str(tmp_path / "d"), "--count", "2", "--size", "30x20", "--classes", "4"]
    )
    assert result.exit_code == 0, result.output
    unary = np.load(tmp_path / "d" / "unaries" / "synth_00001.npy")
    assert unary.shape == (4, 30, 20)
    bad = runner.invoke(main, ["synth", str(tmp_path / "e"), "--size", "30by20"])
    assert bad.exit_code == 2 and "HEIGHTxWIDTH" in bad.stderr
    assert not (tmp_path / "e").exists()
    one_class = runner.invoke(main, ["synth", str(tmp_path / "f"), "--classes", "1"])
    assert one_class.exit_code == 2 and "'--classes': 1 is not in the range 2<=x<=256" in (
        one_class.stderr
    )
    assert not (tmp_path / "f").exists()
    with pytest.raises(ValueError, match="at least 2 classes"):
        write_dataset(tmp_path / "g", 1, 8, 8, 1, seed=0)
    assert not (tmp_path / "g").exists()


def test_synth_refuses_to_mix_two_runs_and_negative_seeds(tmp_path):
    runner = cli_runner()
    out = str(tmp_path / "d")
    common = ["--size", "8x8", "--classes", "3"]
    assert runner.invoke(main, ["synth", out, "--count", "3", *common]).exit_code == 0
    same = runner.invoke(main, ["synth", out, "--count", "3", "--seed", "4", *common])
    assert same.exit_code == 0, same.output  # every file replaced
    larger = runner.invoke(main, ["synth", out, "--count", "4", *common])
    assert larger.exit_code == 0, larger.output
    smaller = runner.invoke(main, ["synth", out, "--count", "2", *common])
    assert smaller.exit_code == 2
    assert smaller.stderr.startswith(f"convcrf: error: {out}: holds 6 file(s) that this run")
    assert "synth_00002.png" in smaller.stderr and "mix two runs" in smaller.stderr
    assert len(list((tmp_path / "d" / "images").iterdir())) == 4  # nothing written
    negative = runner.invoke(main, ["synth", str(tmp_path / "e"), "--seed", "-1"])
    assert negative.exit_code == 2 and "'--seed': -1 is not in the range x>=0" in negative.stderr


@pytest.mark.parametrize("blocked", ["images", "labels"])
def test_synth_refuses_a_file_in_place_of_a_dataset_directory(tmp_path, blocked):
    (tmp_path / blocked).write_text("not a directory")
    result = cli_runner().invoke(main, ["synth", str(tmp_path), "--count", "1", "--size", "8x8"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"convcrf: error: {tmp_path / blocked}: exists and is not a directory\n"
    )
    assert [path.name for path in tmp_path.iterdir()] == [blocked]  # no directory made


def test_synth_into_a_directory_that_cannot_be_looked_at_is_one_line(tmp_path):
    # Path.exists raised OSError for a name too long before Python 3.12 (a traceback), and the
    # directories made on the way to it were left behind.
    long = tmp_path / "made" / ("x" * 300)
    result = cli_runner().invoke(main, ["synth", str(long), "--count", "1", "--size", "8x8"])
    assert result.exit_code == 2
    assert result.stderr == f"convcrf: error: {long}: cannot write dataset: File name too long\n"
    assert list(tmp_path.iterdir()) == []


_SYNTH_UNDER_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from convcrf_cli.entry import main
sys.argv = ["convcrf", "synth", *sys.argv[2:]]
main()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ")
def test_a_failed_write_is_exit_1_naming_the_file_and_leaves_whole_samples(tmp_path):
    # 48x64 samples: images and labels of a few kB fit in 16 kB, the 5 classes' unary does not
    out = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-c", _SYNTH_UNDER_SIZE_LIMIT, str(16 * 1024), str(out),
         "--count", "2", "--size", "48x64", "--classes", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"convcrf: error: {out / 'unaries' / 'synth_00000.npy'}: cannot write: File too large\n"
    )
    assert list(tmp_path.iterdir()) == []  # no half sample, nor the directories made for it
