"""Options and error reporting shared by the CLI commands."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from convcrf_cli.backends import DeviceError
from convcrf_cli.core import InputError
from convcrf_cli.errors import ConvCRFError
from convcrf_cli.params import INIT_CHOICES, CRFParams, ParamsError

_DEFAULTS = CRFParams()

# (field, option names, help) in the order of DESIGN §2's table.
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
        help="JSON file of parameters (as written by `convcrf params` or `convcrf fit`); "
        "options given explicitly override it.",
    )(func)
    return func


PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(CRFParams))


def params_from_options(options: dict[str, Any], base: CRFParams | None = None) -> CRFParams:
    """Pop the CRF options from ``options`` and build the validated CRFParams.

    Precedence: explicit options, then ``--params FILE``, then ``base`` (the defaults if None).
    """
    params_file = options.pop("params_file", None)
    if params_file is not None:
        base = CRFParams.load(params_file)
    base = base or CRFParams()
    given = {name: options.pop(name) for name in PARAM_FIELDS if name in options}
    return base.replace(**{k: v for k, v in given.items() if v is not None})


def echo_err(message: str) -> None:
    """Write one line to stderr (stdout is reserved for command output)."""
    click.echo(message, err=True)


def reports_errors(func: Callable) -> Callable:
    """Turn library errors into one ``convcrf: error: ...`` line on stderr and an exit status."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConvCRFError as exc:
            fail(str(exc), exc.exit_code)
        except (ParamsError, InputError, DeviceError) as exc:
            fail(str(exc), 2)
        except MemoryError:
            fail(
                "out of memory: the image is too large for this machine "
                "(try a larger --blur or a smaller image)",
                1,
            )
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def fail(message: str, code: int) -> None:
    echo_err(f"convcrf: error: {message}")
    sys.exit(code)
