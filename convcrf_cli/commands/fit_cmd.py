"""``convcrf fit``: learn CRF parameters from images, frozen unaries and ground-truth labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from tqdm import tqdm

from convcrf_cli.commands.common import (
    crf_options,
    device_option,
    echo_err,
    echo_out,
    options_named,
    params_from_options,
    reports_errors,
    some_paths,
    unary_options_from,
    unary_reading_options,
)
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.fit import FitOptions, FitResult, fit
from convcrf_cli.fit_data import (
    TrainingFiles,
    load_examples,
    pair_training_files,
    read_start,
    start_module,
)
from convcrf_cli.outputs import check_output_file, real_path
from convcrf_cli.params import CRFParams
from convcrf_cli.torch import DEFAULT_LEARN, LEARNABLE_GROUPS, ConvCRF, default_learn
from convcrf_cli.unary import Unary

_FIT_DEFAULTS = FitOptions()
FIT_FIELDS = tuple(field.name for field in dataclasses.fields(FitOptions))


@click.command("fit")
@click.argument("images", type=click.Path(file_okay=False, path_type=Path))
@click.argument("unaries", type=click.Path(file_okay=False, path_type=Path))
@click.argument("labels", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write the learned parameters to (JSON, as `convcrf refine --params` "
    "reads; not -: stdout carries the summary).",
)
@click.option(
    "--epochs",
    type=int,
    default=_FIT_DEFAULTS.epochs,
    show_default=True,
    help="Passes over the training images (one random crop of each per pass).",
)
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
    default=None,
    help=f"Comma-separated groups to learn, from {','.join(LEARNABLE_GROUPS)} (default: "
    f"{','.join(DEFAULT_LEARN)}, plus C and T when the --params file holds their matrices). C "
    "(compatibility transform) and T (colour-feature transform) add matrices to the output "
    "file that only the PyTorch module convcrf_cli.torch.ConvCRF applies; `convcrf refine` "
    "refuses such a file, `convcrf fit --params` starts from it.",
)
@click.option(
    "--seed",
    type=int,
    default=_FIT_DEFAULTS.seed,
    show_default=True,
    help="Random seed of the held-out split and the crops: the same seed, the same run.",
)
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
@click.option(
    "--batch-size",
    type=int,
    default=_FIT_DEFAULTS.batch_size,
    show_default=True,
    help="Crops per training step.",
)
@unary_reading_options(
    click.option(
        "--ignore-label",
        type=int,
        default=_FIT_DEFAULTS.ignore_label,
        show_default=True,
        help="Label value that is no class: pixels of the label maps with it are left out of "
        "the loss and the mean IoU, pixels of a label-image unary with it get a uniform "
        "distribution over the classes.",
    )
)
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
    learn: str | None,
    seed: int,
    val_fraction: float,
    crop_size: int,
    batch_size: int,
    device: str,
    verbose: bool,
    **options: object,
) -> None:
    """Learn CRF parameters from IMAGES, UNARIES and LABELS (three directories).

    Files are paired by relative path and stem (suffixes in any case): images/a.png,
    unaries/a.npy, labels/a.png. Unaries are read as `convcrf refine` reads them: .npy or .npz
    arrays, or label images (.png, .tif, .bmp) of the segmenter's class ids, which have their
    largest label + 1 classes unless --num-classes says how many (every unary must give the
    same number); a name with both is its array, and where UNARIES is also IMAGES or LABELS,
    only its arrays are unaries. Labels
    are grayscale or palette images of class ids; pixels equal to --ignore-label are not
    used. The segmenter is frozen: only the CRF learns, starting from --params (a file of
    `convcrf params` or `convcrf fit`, C and T matrices included) and the CRF options (the
    defaults otherwise). A random --val-fraction of the images is held out and its mean IoU
    with the starting and the learned parameters is printed at the end. Missing directories
    of OUTPUT are created.

    Exit status: 0 ok, 1 training diverged or the output could not be written, 2 bad usage
    or input (checked before training), 130 interrupted.
    """
    if str(output) == "-":
        raise BadInputError(
            output,
            "the learned parameters are written to a file, not stdout (which carries "
            "the summary); give a file name",
        )
    reading = unary_options_from(options)
    params_file = options.pop("params_file")
    base, transforms = read_start(params_file) if params_file else (None, {})
    params = params_from_options(options, base)
    start: CRFParams | ConvCRF = params
    if learn is None:  # go on training the matrices the file holds, as ConvCRF.load does
        learn = default_learn("compat_transform" in transforms, "feature_transform" in transforms)
    with options_named(FIT_FIELDS):
        fit_options = FitOptions(
            epochs=epochs,
            lr=lr,
            learn=learn,
            seed=seed,
            val_fraction=val_fraction,
            crop_size=crop_size,
            batch_size=batch_size,
            ignore_label=reading.ignore_label,
        )
    files, unused = pair_training_files(images, unaries, labels)
    for kind, paths in unused.items():
        if paths:
            echo_err(
                f"convcrf: warning: {len(paths)} {kind} file(s) without an image, not used: "
                f"{some_paths(paths)}"
            )
    inputs = {real_path(path) for item in files for path in (item.image, item.unary, item.labels)}
    if real_path(output) in inputs:
        raise BadInputError(output, "output would overwrite an input file")
    check_output_file(output)

    def loaded(entry: TrainingFiles, unary: Unary, warnings: tuple[str, ...]) -> None:
        for warning in warnings:
            echo_err(f"convcrf: warning: {warning}")
        if verbose:
            echo_err(
                f"{entry.key}: {entry.image} + {entry.unary} ({unary.kind}, "
                f"{unary.num_classes} classes) + {entry.labels}"
            )
            for note in unary.notes:
                echo_err(f"convcrf: note: {note}")

    examples = load_examples(files, reading, loaded, blur=params.blur)
    if transforms:
        start = start_module(params_file, params, transforms, examples, fit_options.learn)
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
