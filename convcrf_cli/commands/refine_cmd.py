"""``convcrf refine IMAGE UNARY -o OUT``: refine one image's segmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from convcrf_cli.backends import select_backend
from convcrf_cli.commands.common import crf_options, echo_err, params_from_options, reports_errors
from convcrf_cli.errors import BadInputError
from convcrf_cli.outputs import PROBS_DTYPES, STDOUT, OutputSpec
from convcrf_cli.pipeline import ItemResult, UnaryOptions, describe_backend, refine_item
from convcrf_cli.unary import AUTO_TOLERANCE, DEFAULT_LABEL_CONFIDENCE, PROB_EPS, UNARY_TYPES

_UNARY_TYPE_HELP = (
    "What the UNARY array holds. prob: probabilities, converted with log(max(p, "
    f"{PROB_EPS:g})); logit: class scores, used as they are; energy: pydensecrf energies "
    "-log p, converted to -E; auto: prob when every value lies in [0, 1] and each pixel's "
    f"values sum to 1 within {AUTO_TOLERANCE:g} (one channel: values in [0, 1]), logit "
    "otherwise (energies are never guessed). A single channel is a foreground score: "
    "two classes, background and foreground."
)


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
    "--alpha",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Opacity of the label colours in the overlay.",
)
@click.option(
    "--probs",
    default=None,
    help="Also write refined probabilities (.npy) in the layout of UNARY (CHW or HWC; "
    "CHW for a label image).",
)
@click.option(
    "--probs-dtype",
    type=click.Choice(PROBS_DTYPES),
    default="float32",
    show_default=True,
    help="Data type of --probs.",
)
@click.option(
    "--unary-type",
    type=click.Choice(UNARY_TYPES),
    default="auto",
    show_default=True,
    help=_UNARY_TYPE_HELP,
)
@click.option(
    "--layout",
    type=click.Choice(("auto", "CHW", "HWC"), case_sensitive=False),
    default="auto",
    show_default=True,
    help="Axis order of UNARY; auto matches its shape to the image size (needed only when "
    "both fit: a square image with C = H = W).",
)
@click.option(
    "--label-confidence",
    type=float,
    default=DEFAULT_LABEL_CONFIDENCE,
    show_default=True,
    help="For a label-image UNARY: probability of each pixel's label; the rest is spread "
    "evenly over the other classes (as pydensecrf's unary_from_labels).",
)
@click.option(
    "--ignore-label",
    type=int,
    default=None,
    help="For a label-image UNARY: label of unsure pixels (e.g. 255), given a uniform "
    "distribution over the classes.",
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    default=None,
    help="Number of classes: for a label image (default: largest label + 1); for an array, "
    "checked against its class axis.",
)
@click.option(
    "--exif-orientation",
    type=click.Choice(("apply", "ignore")),
    default="apply",
    show_default=True,
    help="Use IMAGE in its EXIF orientation (as viewers and cv2.imread show it) or as stored. "
    "UNARY must be in the same orientation.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA if usable, else the CPU), cpu, cuda or cuda:N.",
)
@click.option("-v", "--verbose", is_flag=True, help="Report device, input details and timing.")
@crf_options
@reports_errors
def refine_command(
    image: str,
    unary_source: str,
    output: str,
    overlay: str | None,
    alpha: float,
    probs: str | None,
    probs_dtype: str,
    unary_type: str,
    layout: str,
    label_confidence: float,
    ignore_label: int | None,
    num_classes: int | None,
    exif_orientation: str,
    device: str,
    verbose: bool,
    **crf: object,
) -> None:
    """Refine the segmentation UNARY of IMAGE with a ConvCRF; write the labels to -o OUTPUT.

    IMAGE: any image Pillow reads (JPEG, PNG incl. 16-bit, TIFF, WebP); alpha is dropped,
    grayscale is one feature channel. UNARY: .npy or .npz (float16/32/64, [C,H,W] or [H,W,C],
    optionally with a leading batch axis of 1; an .npz with several arrays needs one named
    'unary'), a label image (.png, .tif, .bmp) of class ids, or - for .npy bytes on stdin.

    Only the output goes to stdout; messages go to stderr. Exit status: 0 ok, 1 runtime
    failure, 2 bad usage or input.
    """
    if output == STDOUT and sys.stdout.isatty():
        raise BadInputError(None, "-o - writes a PNG to stdout, which is a terminal; redirect it")
    params = params_from_options(crf)
    backend = select_backend(device)
    if verbose:
        fallback = getattr(backend, "fallback_reason", None)
        echo_err(
            f"convcrf: device: {describe_backend(backend)}"
            + (f" (auto chose the CPU: {fallback})" if fallback else "")
        )
    spec = OutputSpec(
        labels=output,
        overlay=overlay,
        probs=probs,
        probs_dtype=probs_dtype,
        alpha=alpha,
    )
    options = UnaryOptions(
        unary_type=unary_type,
        layout="auto" if layout.lower() == "auto" else layout.upper(),
        label_confidence=label_confidence,
        ignore_label=ignore_label,
        num_classes=num_classes,
        apply_exif=exif_orientation == "apply",
    )
    result = refine_item(image, unary_source, spec, params, backend, options)
    for warning in result.warnings:
        echo_err(f"convcrf: warning: {warning}")
    if verbose:
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
