"""``convcrf refine IMAGE UNARY -o OUT``: refine one image's segmentation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from convcrf_cli.backends import select_backend
from convcrf_cli.commands.common import (
    DEVICE_HELP,
    crf_options,
    device_line,
    device_option,
    echo_err,
    one_stdin_reader,
    output_format_options,
    params_from_options,
    report_tunings,
    reports_errors,
    tune_option,
    unary_options,
    unary_options_from,
)
from convcrf_cli.errors import BadInputError
from convcrf_cli.outputs import STDOUT, OutputSpec
from convcrf_cli.pipeline import ItemResult, refine_item


@click.command("refine")
@click.argument("image", metavar="IMAGE")
@click.argument("unary_source", metavar="UNARY")
@click.option(
    "-o",
    "--output",
    required=True,
    help="Refined labels: .png (palette PNG, pixel values = class ids), .npy ([H,W] int32), "
    "or - (PNG on stdout).",
)
@click.option(
    "--overlay",
    default=None,
    help="Also write the label colours blended over the image (.png, .jpg, ...).",
)
@click.option(
    "--probs",
    default=None,
    help="Also write refined probabilities (.npy) in the layout of UNARY (CHW or HWC; "
    "CHW for a label image), at the image's size (also for a resized unary).",
)
@output_format_options
@unary_options
@device_option(DEVICE_HELP)
@tune_option
@click.option("-v", "--verbose", is_flag=True, help="Report device, input details and timing.")
@crf_options
@reports_errors
def refine_command(
    image: str,
    unary_source: str,
    output: str,
    overlay: str | None,
    probs: str | None,
    device: str,
    tune: bool,
    verbose: bool,
    **options: object,
) -> None:
    """Refine the segmentation UNARY of IMAGE with a ConvCRF; write the labels to -o OUTPUT.

    IMAGE: any image Pillow reads (JPEG, PNG incl. 16-bit grayscale, TIFF, WebP, BMP); alpha
    is dropped, grayscale is one feature channel. UNARY: .npy or .npz (float16/32/64, [C,H,W]
    or [H,W,C], optionally with a leading batch axis of 1; an .npz with several arrays needs
    one named 'unary'), a label image (.png, .tif, .bmp) of class ids, or - for .npy (or .npz)
    bytes on stdin.

    Only the output goes to stdout; messages go to stderr. Exit status: 0 ok, 1 runtime
    failure, 2 bad usage or input, 130 interrupted.
    """
    if image == "-":
        raise BadInputError(
            "-", "the image is read from a file, not stdin (stdin can carry the unary: UNARY -)"
        )
    if os.path.isdir(image):  # False where it cannot be looked at: reading it says why
        raise BadInputError(
            image,
            "is a directory; `convcrf batch IMAGES_DIR UNARIES_DIR -o OUT_DIR` refines directories",
        )
    if output == STDOUT and sys.stdout is not None and sys.stdout.isatty():
        raise BadInputError(None, "-o - writes a PNG to stdout, which is a terminal; redirect it")
    one_stdin_reader({"UNARY": unary_source, "--params": options.get("params_file")})
    params = params_from_options(options)
    unary = unary_options_from(options)
    backend = select_backend(device, tune=tune)
    if verbose:
        echo_err(device_line(backend))
    spec = OutputSpec(
        labels=output,
        overlay=overlay,
        probs=probs,
        probs_dtype=options.pop("probs_dtype"),
        alpha=options.pop("alpha"),
    )
    result = refine_item(image, unary_source, spec, params, backend, unary)
    for warning in result.warnings:
        echo_err(f"convcrf: warning: {warning}")
    if verbose:
        report_tunings(backend)
        _report(result)


def _report(result: ItemResult) -> None:
    for note in result.notes:
        echo_err(f"convcrf: note: {note}")
    height, width = result.image_hw
    echo_err(f"convcrf: image: {result.image} ({height}×{width})")
    echo_err(f"convcrf: unary: {result.unary}: {result.num_classes} classes, {result.unary_reason}")
    echo_err(
        f"convcrf: refined in {result.seconds:.3f} s (CRF {result.crf_seconds:.3f} s on "
        f"{result.device})"
    )
    for path in result.written:
        echo_err(f"convcrf: wrote {'stdout' if path == '-' else Path(path)}")
