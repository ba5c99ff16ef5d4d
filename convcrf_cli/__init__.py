"""convcrf: refine semantic segmentations with a Convolutional CRF (Teichmann & Cipolla 2018)."""

from convcrf_cli.backends import DeviceError
from convcrf_cli.core import InputError, refine
from convcrf_cli.params import CRFParams, ParamsError

__all__ = ["CRFParams", "DeviceError", "InputError", "ParamsError", "refine"]
__version__ = "0.1.0"
