"""``convcrf fit``: learn CRF parameters from images, frozen unaries and ground-truth labels."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import click
import numpy as np
from tqdm import tqdm

from convcrf_cli.batch_items import IMAGE_GLOBS, UNARY_GLOBS, find_files
from convcrf_cli.commands.common import (
    check_output_file,
    crf_options,
    device_option,
    echo_err,
    echo_out,
    params_from_options,
    reports_errors,
    some_paths,
    unary_type_option,
)
from convcrf_cli.core import InputError
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.fit import Example, FitOptions, FitResult, check_start_module, fit
from convcrf_cli.imageio import check_label_size, read_image, read_label_image
from convcrf_cli.params import TRANSFORM_KEYS, CRFParams, ParamsError, read_params_json
from convcrf_cli.torch import DEFAULT_LEARN, LEARNABLE_GROUPS, ConvCRF
from convcrf_cli.unary import read_unary

LABEL_GLOBS = ("*.png", "*.tif", "*.tiff", "*.bmp")

_FIT_DEFAULTS = FitOptions()


class TrainingFiles(NamedTuple):
    """The files of one training image, paired by ``key`` (relative path without suffix)."""

    key: str
    image: Path
    unary: Path
    labels: Path


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
    "PyTorch module convcrf_cli.torch.ConvCRF applies; `convcrf refine` refuses such a file, "
    "`convcrf fit --params` starts from it.",
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

    Files are paired by relative path and stem (suffixes in any case): images/a.png,
    unaries/a.npy, labels/a.png. Labels are grayscale or palette images of class ids; pixels
    equal to --ignore-label are not used. The segmenter is frozen: only the CRF learns,
    starting from --params (a file of `convcrf params` or `convcrf fit`, C and T matrices
    included) and the CRF options (the defaults otherwise). A random --val-fraction of the
    images is held out and its mean IoU with the starting and the learned parameters is
    printed at the end. Missing directories of OUTPUT are created.

    Exit status: 0 ok, 1 training diverged or the output could not be written, 2 bad usage
    or input (checked before training).
    """
    params_file = options.pop("params_file")
    base, transforms = _read_start(params_file) if params_file else (None, {})
    start: CRFParams | ConvCRF = params_from_options(options, base)
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
    files = pair_files(images, unaries, labels)
    inputs = {path.resolve() for item in files for path in (item.image, item.unary, item.labels)}
    if output.resolve() in inputs:
        raise BadInputError(output, "output would overwrite an input file")
    check_output_file(output)
    examples = load_examples(files, unary_type, ignore_label, verbose)
    if transforms:
        start = _start_module(params_file, start, transforms, examples, fit_options.learn)
    with tqdm(total=None, desc="fit", unit="step", disable=None, leave=False) as bar:

        def progress(step: int, total: int, running_loss: float) -> None:
            bar.total = total
            bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)
            bar.update(step - bar.n)

        result = fit(examples, start, fit_options, device=device, progress=progress)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        result.module.save(output)
    except OSError as exc:
        raise RuntimeFailure(f"{output}: cannot write: {exc.strerror}") from exc
    report(result, output, verbose)


def _read_start(path: Path) -> tuple[CRFParams, dict]:
    """The parameters of a ``--params`` file and its C/T matrices (JSON lists of rows, by key
    of :data:`TRANSFORM_KEYS`; checked by :func:`_start_module`)."""

    def split(data: object) -> tuple[CRFParams, dict]:
        if not isinstance(data, dict):
            return CRFParams.from_dict(data), {}  # raises, naming the type
        fields = {key: value for key, value in data.items() if key not in TRANSFORM_KEYS}
        return CRFParams.from_dict(fields), {k: data[k] for k in TRANSFORM_KEYS if k in data}

    return read_params_json(path, split)


def _start_module(
    path: Path,
    params: CRFParams,
    transforms: dict,
    examples: list[Example],
    learn: tuple[str, ...],
) -> ConvCRF:
    """The starting module: ``params`` with the C/T matrices of the file ``path``, which must
    fit the examples' classes and image channels."""
    num_classes, num_features = examples[0].logits.shape[0], _channels(examples[0].image)
    try:
        saved = ConvCRF.from_dict(
            {**params.to_dict(), **transforms}, num_classes, learn, num_features=num_features
        )
        check_start_module(saved, num_classes, num_features)
        return saved
    except (ParamsError, InputError) as exc:
        raise BadInputError(path, str(exc)) from exc


def pair_files(images: Path, unaries: Path, labels: Path) -> list[TrainingFiles]:
    """The files of every image, paired by relative path and stem (suffixes matched ignoring
    case); an image without a unary or a label map is an error, a unary or label map without
    an image a warning on stderr (it is not used)."""
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
    for files, kind in ((unary_files, "unary"), (label_files, "label map")):
        unused = sorted(str(files[key]) for key in files.keys() - image_files.keys())
        if unused:
            echo_err(
                f"convcrf: warning: {len(unused)} {kind} file(s) without an image, not used: "
                f"{some_paths(unused)}"
            )
    return [
        TrainingFiles(key, image_files[key], unary_files[key], label_files[key])
        for key in sorted(image_files)
    ]


def load_examples(
    files: list[TrainingFiles], unary_type: str, ignore_label: int, verbose: bool
) -> list[Example]:
    """Read the files of :func:`pair_files`, checking sizes, classes and label values."""
    examples: list[Example] = []
    for key, image_file, unary_file, label_file in files:
        image = read_image(image_file)
        unary = read_unary(unary_file, image.shape[:2], unary_type)
        for warning in unary.warnings:
            echo_err(f"convcrf: warning: {warning}")
        num_classes = unary.num_classes
        if examples and num_classes != examples[0].logits.shape[0]:
            raise BadInputError(
                unary_file,
                f"unary has {num_classes} classes, {files[0].unary} has "
                f"{examples[0].logits.shape[0]}",
            )
        channels = _channels(image)
        if examples and channels != _channels(examples[0].image):
            raise BadInputError(
                image_file,
                f"image has {channels} channel(s), {files[0].image} has "
                f"{_channels(examples[0].image)}",
            )
        label_map = read_label_image(label_file)
        check_labels(label_file, label_map, image.shape[:2], num_classes, ignore_label)
        if verbose:
            echo_err(
                f"{key}: {image_file} + {unary_file} ({unary.kind}, {num_classes} classes) + "
                f"{label_file}"
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
        why = "no held-out images"
        if result.val_names:
            why = "the held-out labels hold only the ignore label"
        echo_out(f"learned parameters written to {output} ({why}: no mean IoU)", "the summary")
        return
    echo_out(
        f"held-out mIoU ({len(result.val_names)} images): unary {100 * result.miou_unary:.2f}, "
        f"CRF before {100 * result.miou_before:.2f}, after {100 * result.miou_after:.2f}\n"
        f"learned parameters written to {output}",
        "the summary",
    )
