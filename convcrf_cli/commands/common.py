"""Options and error reporting shared by the CLI commands."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from convcrf_cli.backends import Backend, DeviceError
from convcrf_cli.core import InputError
from convcrf_cli.entry import command_started
from convcrf_cli.errors import OUT_OF_MEMORY_ADVICE, ConvCRFError
from convcrf_cli.outputs import PROBS_DTYPES, stdout_failure
from convcrf_cli.params import INIT_CHOICES, CRFParams, ParamsError
from convcrf_cli.pipeline import UnaryOptions, describe_backend
from convcrf_cli.resize import RESIZE_MODES
from convcrf_cli.unary import AUTO_TOLERANCE, DEFAULT_LABEL_CONFIDENCE, PROB_EPS, UNARY_TYPES

_DEFAULTS = CRFParams()

# (field, option names, help) in the order of README's Parameters table.
_PARAM_OPTIONS: list[tuple[str, tuple[str, ...], str]] = [
    ("filter_size", ("--filter-size", "-k"), "Odd window size on the (blurred) grid."),
    ("blur", ("--blur",), "Message passing runs on a grid this many times coarser."),
    ("iterations", ("--iterations", "-n"), "Mean-field iterations."),
    ("pos_sdims", ("--pos-sdims",), "Positional feature scale (pixels)."),
    ("pos_compat", ("--pos-compat",), "Weight of the positional (smoothness) kernel."),
    ("col_schan", ("--col-schan",), "Colour feature scale (image intensity units)."),
    ("col_compat", ("--col-compat",), "Weight of the colour (appearance) kernel."),
    ("weight", ("--weight",), "Message weight w."),
    ("unary_weight", ("--unary-weight",), "Unary weight u."),
]


def crf_options(func: Callable) -> Callable:
    """Add one option per CRFParams field plus ``--params FILE.json``.

    Options default to None so that values from ``--params`` are overridden only by options
    given explicitly; the help shows the built-in default.
    """
    for field, names, text in reversed(_PARAM_OPTIONS):
        default = getattr(_DEFAULTS, field)
        kind = int if isinstance(default, int) else float
        func = click.option(
            *names, field, type=kind, default=None, help=f"{text}  [default: {default}]"
        )(func)
    func = click.option(
        "--init",
        "init",
        type=click.Choice(INIT_CHOICES),
        default=None,
        help="First Q: softmax (textbook mean field) or log (the original implementation)."
        f"  [default: {_DEFAULTS.init}]",
    )(func)
    func = click.option(
        "--params",
        "params_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="JSON file of parameters (as written by `convcrf params` or `convcrf fit`; - reads "
        "stdin); options given explicitly override it.",
    )(func)
    return func


PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(CRFParams))


def one_stdin_reader(sources: dict[str, object]) -> None:
    """Refuse, as a usage error, more than one of ``sources`` (what the user called each:
    an option or argument name) reading stdin (``-``)."""
    readers = [name for name, source in sources.items() if str(source) == "-"]
    if len(readers) > 1:
        raise click.UsageError(f"{' and '.join(readers)} cannot both read stdin (-)")


def params_from_options(options: dict[str, Any], base: CRFParams | None = None) -> CRFParams:
    """Pop the CRF options from ``options`` and build the validated CRFParams.

    Precedence: explicit options, then ``--params FILE``, then ``base`` (the defaults if None).
    """
    params_file = options.pop("params_file", None)
    if params_file is not None:
        base = CRFParams.load(params_file)
    base = base or CRFParams()
    given = {name: options.pop(name) for name in PARAM_FIELDS if name in options}
    with options_named(PARAM_FIELDS):
        return base.replace(**{k: v for k, v in given.items() if v is not None})


@contextlib.contextmanager
def options_named(fields: Iterable[str]) -> Iterator[None]:
    """Turn a :class:`ParamsError` into a usage error (exit status 2, with the ``--help``
    hint), naming the option where it begins with one of ``fields`` (the options' field
    names): ``filter_size must be ...`` becomes ``--filter-size must be ...``."""
    try:
        yield
    except ParamsError as exc:
        field, _, problem = str(exc).partition(" ")
        if field in set(fields):
            raise click.UsageError(f"--{field.replace('_', '-')} {problem}") from exc
        raise click.UsageError(str(exc)) from exc


_UNARY_TYPE_HELP = (
    "What the unary array holds. prob: probabilities, converted with log(max(p, "
    f"{PROB_EPS:g})); logit: class scores, used as they are; energy: pydensecrf energies "
    "-log p, converted to -E; auto: prob when every value lies in [0, 1] and each pixel's "
    f"values sum to 1 within {AUTO_TOLERANCE:g} (one channel: values in [0, 1]), logit "
    "otherwise (energies are never guessed). A single channel is a foreground score: "
    "two classes, background and foreground."
)

unary_type_option = click.option(
    "--unary-type",
    type=click.Choice(UNARY_TYPES),
    default="auto",
    show_default=True,
    help=_UNARY_TYPE_HELP,
)


exif_orientation_option = click.option(
    "--exif-orientation",
    type=click.Choice(("apply", "ignore")),
    default="apply",
    show_default=True,
    help="Use the image in its EXIF orientation (as viewers and cv2.imread show it) or as "
    "stored. The unary must be in the same orientation.",
)


def unary_reading_options(ignore_label_option: Callable) -> Callable[[Callable], Callable]:
    """A decorator adding the options that say how to read a unary, with
    ``ignore_label_option`` as its ``--ignore-label`` (stored as ``ignore_label``: what the
    label means beyond a label-image unary differs between commands);
    :func:`unary_options_from` reads them."""
    decorators = [
        unary_type_option,
        click.option(
            "--layout",
            type=click.Choice(("auto", "CHW", "HWC"), case_sensitive=False),
            default="auto",
            show_default=True,
            help="Axis order of the unary; auto matches its shape to the image size (needed "
            "only when both fit: a square image with C = H = W). With --resize-unary, auto "
            "takes a reading of the image's size, else the one of its aspect ratio "
            "(|h·W − w·H| ≤ H + W, a downscale rounded by up to a pixel a side); when both or "
            "neither have it, pass --layout (it then takes any size).",
        ),
        click.option(
            "--resize-unary",
            type=click.Choice(RESIZE_MODES),
            default="none",
            show_default=True,
            help="Bring a unary of another size (output stride 8, a fixed network size) to the "
            "image's: bilinear resizes an array's logits, after the --unary-type conversion, "
            "as segmentation networks upsample theirs (PyTorch's interpolate, mode bilinear, "
            "align_corners=False, in float32), and a label image by nearest neighbour. none: "
            "the unary must have the image's size.",
        ),
        click.option(
            "--label-confidence",
            type=float,
            default=DEFAULT_LABEL_CONFIDENCE,
            show_default=True,
            help="For a label-image unary: probability of each pixel's label; the rest is "
            "spread evenly over the other classes (as pydensecrf's unary_from_labels).",
        ),
        ignore_label_option,
        click.option(
            "--num-classes",
            type=click.IntRange(min=1),
            default=None,
            help="Number of classes: for a label image (default: largest label + 1); for an "
            "array, checked against its class axis.",
        ),
        exif_orientation_option,
    ]

    def add(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return add


unary_options = unary_reading_options(
    click.option(
        "--ignore-label",
        type=int,
        default=None,
        help="For a label-image unary: label of unsure pixels (e.g. 255), given a uniform "
        "distribution over the classes.",
    )
)
"""The options of ``refine`` and ``batch`` that say how to read a unary."""


def unary_options_from(options: dict[str, Any]) -> UnaryOptions:
    """Pop the options of :func:`unary_reading_options` from ``options``."""
    layout = options.pop("layout")
    return UnaryOptions(
        unary_type=options.pop("unary_type"),
        layout="auto" if layout.lower() == "auto" else layout.upper(),
        label_confidence=options.pop("label_confidence"),
        ignore_label=options.pop("ignore_label"),
        num_classes=options.pop("num_classes"),
        apply_exif=options.pop("exif_orientation") == "apply",
        resize=options.pop("resize_unary"),
    )


def device_option(help_text: str) -> Callable:
    """``--device`` (default ``auto``) with ``help_text``."""
    return click.option("--device", default="auto", show_default=True, help=help_text)


DEVICE_HELP = "auto (CUDA if usable, else the CPU), cpu, cuda or cuda:N."


def tune_option(func: Callable) -> Callable:
    """``--tune/--no-tune`` (default on): the CUDA backend's choice of launch variant."""
    return click.option(
        "--tune/--no-tune",
        default=True,
        show_default=True,
        help="On CUDA, time the kernel variants on the first image of each size class and use the "
        "fastest (remembered in $CONVCRF_CACHE_DIR, else $XDG_CACHE_HOME/convcrf or "
        "~/.cache/convcrf; `convcrf info` shows where); --no-tune always uses the default.",
    )(func)


def report_tunings(backend: object) -> None:
    """One stderr line per launch plan the CUDA backend chose (none for the CPU)."""
    for tuning in getattr(backend, "tunings", ()):
        echo_err(f"convcrf: {tuning.describe()}")


def output_format_options(func: Callable) -> Callable:
    """Add ``--alpha`` (overlay opacity) and ``--probs-dtype``."""
    func = click.option(
        "--probs-dtype",
        type=click.Choice(PROBS_DTYPES),
        default="float32",
        show_default=True,
        help="Data type of the refined probabilities.",
    )(func)
    return click.option(
        "--alpha",
        type=click.FloatRange(0.0, 1.0),
        default=0.5,
        show_default=True,
        help="Opacity of the label colours in the overlay.",
    )(func)


PATHS_SHOWN = 10
"""Paths named in one message line (unpaired files, failed items); a report has all."""


def some_paths(paths: list) -> str:
    """The first :data:`PATHS_SHOWN` of ``paths``, comma-separated, and how many more."""
    shown = ", ".join(str(path) for path in paths[:PATHS_SHOWN])
    more = len(paths) - PATHS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def echo_out(text: str, what: str, newline: bool = True) -> None:
    """Write ``text`` (``what`` it is, for the error) to stdout, the command's output; a write
    error (a full disk, a reader that closed the pipe) is a :class:`RuntimeFailure`."""
    try:
        click.echo(text, nl=newline)
    except OSError as exc:
        raise stdout_failure(exc, what) from exc


def device_line(backend: Backend) -> str:
    """``-v``'s line on the device: the backend, and why ``--device auto`` chose the CPU."""
    fallback = getattr(backend, "fallback_reason", None)
    reason = f" (auto chose the CPU: {fallback})" if fallback else ""
    return f"convcrf: device: {describe_backend(backend)}{reason}"


def echo_err(message: str) -> None:
    """Write one line to stderr (stdout is reserved for command output)."""
    click.echo(message, err=True)


def reports_errors(func: Callable) -> Callable:
    """Turn library errors into one ``convcrf: error: ...`` line on stderr and an exit status,
    the command's first Ctrl-C too (a ``KeyboardInterrupt`` from its start on, see
    :mod:`convcrf_cli.entry`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            command_started()
            return func(*args, **kwargs)
        except ConvCRFError as exc:
            fail(str(exc), exc.exit_code)
        except (ParamsError, InputError, DeviceError) as exc:
            fail(str(exc), 2)
        except MemoryError:
            fail(
                f"out of memory: the image is too large for this machine ({OUT_OF_MEMORY_ADVICE})",
                1,
            )
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def fail(message: str, code: int) -> NoReturn:
    """Write ``convcrf: error: message`` to stderr and exit with ``code``."""
    echo_err(f"convcrf: error: {message}")
    sys.exit(code)
