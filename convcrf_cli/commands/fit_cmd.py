"""``convcrf fit``: learn CRF parameters from images, frozen unaries and ground-truth labels."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from convcrf_cli.batch_items import IMAGE_GLOBS, UNARY_GLOBS, find_files
from convcrf_cli.commands.common import (
    crf_options,
    device_option,
    echo_err,
    params_from_options,
    reports_errors,
    unary_type_option,
)
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.fit import Example, FitOptions, FitResult, fit
from convcrf_cli.imageio import check_label_size, read_image, read_label_image
from convcrf_cli.torch import DEFAULT_LEARN, LEARNABLE_GROUPS
from convcrf_cli.unary import read_unary

LABEL_GLOBS = ("*.png", "*.tif", "*.tiff", "*.bmp")

_FIT_DEFAULTS = FitOptions()


@click.command("fit")
@click.argument("images", type=click.Path(file_okay=False, path_type=Path))
@click.argument("unaries", type=click.Path(file_okay=False, path_type=Path))
@click.argument("labels", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the learned parameters (JSON, as `convcrf refine --params` reads).",
)
@click.option("--epochs", type=int, default=_FIT_DEFAULTS.epochs, show_default=True)
@click.option(
    "--lr",
    type=float,
    default=_FIT_DEFAULTS.lr,
    show_default=True,
    help="Adam step size (relative: kernel and message weights move by about lr times their "
    "starting value per step, log-scales and C/T entries by about lr).",
)
@click.option(
    "--learn",
    default=",".join(DEFAULT_LEARN),
    show_default=True,
    help=f"Comma-separated groups to learn, from {','.join(LEARNABLE_GROUPS)}. C (compatibility "
    "transform) and T (colour-feature transform) add matrices to the output file that only the "
    "PyTorch module convcrf_cli.torch.ConvCRF applies; `convcrf refine` refuses such a file.",
)
@click.option("--seed", type=int, default=_FIT_DEFAULTS.seed, show_default=True)
@click.option(
    "--val-fraction",
    type=float,
    default=_FIT_DEFAULTS.val_fraction,
    show_default=True,
    help="Share of the images held out to report mean IoU before and after (0: none).",
)
@click.option(
    "--crop-size",
    type=int,
    default=_FIT_DEFAULTS.crop_size,
    show_default=True,
    help="Training runs on random square crops of this side.",
)
@click.option("--batch-size", type=int, default=_FIT_DEFAULTS.batch_size, show_default=True)
@click.option(
    "--ignore-label",
    type=int,
    default=_FIT_DEFAULTS.ignore_label,
    show_default=True,
    help="Label value left out of the loss and the mean IoU.",
)
@unary_type_option
@device_option("auto, cpu, cuda or cuda:N (training runs in PyTorch on that device).")
@click.option("-v", "--verbose", is_flag=True, help="Report the pairing, split and result.")
@crf_options
@reports_errors
def fit_command(
    images: Path,
    unaries: Path,
    labels: Path,
    output: Path,
    epochs: int,
    lr: float,
    learn: str,
    seed: int,
    val_fraction: float,
    crop_size: int,
    batch_size: int,
    unary_type: str,
    ignore_label: int,
    device: str,
    verbose: bool,
    **options,
) -> None:
    """Learn CRF parameters from IMAGES, UNARIES and LABELS (three directories).

    Files are paired by relative path and stem: images/a.png, unaries/a.npy, labels/a.png.
    Labels are grayscale or palette images of class ids; pixels equal to --ignore-label are
    not used. The segmenter is frozen: only the CRF learns, starting from --params and the CRF
    options (the defaults otherwise). A random --val-fraction of the images is held out and
    its mean IoU with the starting and the learned parameters is printed at the end.
    """
    start = params_from_options(options)
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():  # checked before training, not after
        raise BadInputError(output, f"output directory {directory} does not exist")
    fit_options = FitOptions(
        epochs=epochs,
        lr=lr,
        learn=learn,
        seed=seed,
        val_fraction=val_fraction,
        crop_size=crop_size,
        batch_size=batch_size,
        ignore_label=ignore_label,
    )
    examples = load_examples(images, unaries, labels, unary_type, ignore_label, verbose)
    with tqdm(total=None, desc="fit", unit="step", disable=None, leave=False) as bar:

        def progress(step: int, total: int, running_loss: float) -> None:
            bar.total = total
            bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)
            bar.update(step - bar.n)

        result = fit(examples, start, fit_options, device=device, progress=progress)
    try:
        result.module.save(output)
    except OSError as exc:
        raise RuntimeFailure(f"{output}: cannot write: {exc.strerror}") from exc
    report(result, output, verbose)


def load_examples(
    images: Path,
    unaries: Path,
    labels: Path,
    unary_type: str,
    ignore_label: int,
    verbose: bool,
) -> list[Example]:
    """Read every (image, unary, labels) triple, checking sizes, classes and label values."""
    image_files = find_files(images, IMAGE_GLOBS)
    unary_files = find_files(unaries, UNARY_GLOBS)
    label_files = find_files(labels, LABEL_GLOBS)
    if not image_files:
        raise BadInputError(images, f"no images ({', '.join(IMAGE_GLOBS)})")
    for key, path in sorted(image_files.items()):
        for files, directory, kind in (
            (unary_files, unaries, "unary"),
            (label_files, labels, "label map"),
        ):
            if key not in files:
                raise BadInputError(path, f"no {kind} named {key}.* in {directory}")
    examples: list[Example] = []
    for key in sorted(image_files):
        image = read_image(image_files[key])
        unary = read_unary(unary_files[key], image.shape[:2], unary_type)
        for warning in unary.warnings:
            echo_err(f"convcrf: warning: {unary_files[key]}: {warning}")
        num_classes = unary.num_classes
        if examples and num_classes != examples[0].logits.shape[0]:
            raise BadInputError(
                unary_files[key],
                f"unary has {num_classes} classes, {unary_files[examples[0].name]} has "
                f"{examples[0].logits.shape[0]}",
            )
        channels = _channels(image)
        if examples and channels != _channels(examples[0].image):
            raise BadInputError(
                image_files[key],
                f"image has {channels} channel(s), {image_files[examples[0].name]} has "
                f"{_channels(examples[0].image)}",
            )
        label_map = read_label_image(label_files[key])
        check_labels(label_files[key], label_map, image.shape[:2], num_classes, ignore_label)
        if verbose:
            echo_err(
                f"{key}: {image_files[key]} + {unary_files[key]} ({unary.kind}, "
                f"{num_classes} classes) + {label_files[key]}"
            )
        examples.append(Example(key, image, unary.logits, label_map))
    return examples


def _channels(image: np.ndarray) -> int:
    return 1 if image.ndim == 2 else int(image.shape[2])


def check_labels(
    path: Path, labels: np.ndarray, image_hw: tuple[int, int], num_classes: int, ignore: int
) -> None:
    """Raise BadInputError naming ``path`` unless ``labels`` fit the image and the classes."""
    check_label_size(path, labels, image_hw)
    values = labels[labels != ignore]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise BadInputError(
            path,
            f"label values must lie in [0, {num_classes}) for {num_classes} classes or equal "
            f"--ignore-label {ignore}; found {int(values.min())}..{int(values.max())}",
        )


def report(result: FitResult, output: Path, verbose: bool) -> None:
    """Print the held-out mean IoU before/after on stdout; details on stderr with -v."""
    if verbose:
        echo_err(
            f"trained on {len(result.train_names)}, held out {len(result.val_names)}: "
            f"{', '.join(result.val_names) or '-'}"
        )
        echo_err(f"final loss {result.losses[-1]:.4f}; wrote {output}")
    if result.miou_after is None:
        click.echo(f"learned parameters written to {output} (no held-out images: no mean IoU)")
        return
    click.echo(
        f"held-out mIoU ({len(result.val_names)} images): unary {100 * result.miou_unary:.2f}, "
        f"CRF before {100 * result.miou_before:.2f}, after {100 * result.miou_after:.2f}"
    )
    click.echo(f"learned parameters written to {output}")
