"""convcrf: refine semantic segmentations with a Convolutional CRF (Teichmann & Cipolla 2018).

The public names are imported on first use, and this module imports little else (not even
:mod:`typing`), so that the ``convcrf`` command's entry point (``convcrf_cli.entry``) installs
its Ctrl-C handler as early as it can, long before NumPy and torch are loaded.
"""

from __future__ import annotations

import importlib

import convcrf_cli.forks  # noqa: F401  (notes forks from now on; see its docstring)

TYPE_CHECKING = False  # not typing's: importing typing would delay the command's SIGINT handler
if TYPE_CHECKING:
    from convcrf_cli.backends import DeviceError
    from convcrf_cli.core import InputError, refine
    from convcrf_cli.params import CRFParams, ParamsError

__all__ = ["CRFParams", "DeviceError", "InputError", "ParamsError", "refine"]
__version__ = "0.1.0"

_MODULE_OF = {
    "CRFParams": "convcrf_cli.params",
    "DeviceError": "convcrf_cli.backends",
    "InputError": "convcrf_cli.core",
    "ParamsError": "convcrf_cli.params",
    "refine": "convcrf_cli.core",
}
"""The module that defines each public name."""


def __getattr__(name: str) -> object:
    """Import a public name from its module on first use (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'convcrf_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value
