"""The ``convcrf`` command's entry point (``python -m convcrf_cli`` too).

Ctrl-C ends the command's startup at once, and stops a command once. :func:`main` installs its
SIGINT handler before anything else: until the command's own code runs (while the commands'
modules, torch, are imported and the arguments are parsed), a Ctrl-C writes
``convcrf: error: interrupted`` and exits with status 130 from the handler itself, raising
nothing into the code it interrupted (a ``KeyboardInterrupt`` raised there could reach torch's
C++ initialisation, which then aborted the process, or Click, which reported it as
``aborted``). From the start of a command (:func:`command_started`), the first SIGINT raises
``KeyboardInterrupt``, which the commands report with the same line and status, and later ones
are ignored while the command stops (a second Ctrl-C broke the shutdown of a batch's worker
threads and aborted the process). Only a Ctrl-C in the first milliseconds, while Python itself
starts and before it runs this module, is Python's own (a traceback): the package and this
module import little before the handler is installed. A failure to load torch (too little memory
under ``ulimit -v``, a broken install) is one line with exit status 1. An interrupted or
terminated command exits at once, without waiting for a computation still running in a worker
thread (a batch's CRF, or the CRF and training where denormals are flushed in a worker of
their own): its outputs are written by the command itself, which has removed what it had
begun to write. Pillow's warnings about damaged metadata (a malformed EXIF block, TIFF tags
that point past the end of the file) are not shown: the file is read or refused with one line.
The package's own warnings (the PyTorch module's fallback from the fused CUDA kernels under
``convcrf fit``) are one line, ``convcrf: warning: ...``, as the commands' warnings are.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import warnings

TYPE_CHECKING = False  # not typing's: importing typing would delay the SIGINT handler
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn, TextIO


def main() -> None:
    """Run the ``convcrf`` command group on ``sys.argv``."""
    signal.signal(signal.SIGINT, interrupt_while_starting)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    warnings.showwarning = functools.partial(show_warning, warnings.showwarning)
    try:
        from convcrf_cli.cli import main as command_group
    except (ImportError, MemoryError, OSError) as exc:  # torch cannot load (little memory, ...)
        # OSError: a CUDA build of torch whose CUDA libraries cannot be mapped into memory
        _cannot_start(exc)
    try:
        command_group(prog_name="convcrf")
    except SystemExit as exc:
        if exc.code in STOPPED:
            _exit_now(exc.code)
        raise


STOPPED = (130, 143)
"""Exit statuses of a command interrupted (SIGINT) or terminated (SIGTERM)."""


def _exit_now(status: int) -> NoReturn:
    """Exit with ``status`` without joining the worker threads (their work is not needed)."""
    _flush_streams()
    os._exit(status)


def _flush_streams() -> None:
    """Flush stdout and stderr, as far as they can be."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
"""Where the package's modules are: warnings raised there are its own."""


def show_warning(
    show_other: Callable[..., None],
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` of the command: a warning raised by the package as one line
    ``convcrf: warning: MESSAGE`` on stderr, others by ``show_other`` (Python's display)."""
    if os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep):
        sys.stderr.write(f"convcrf: warning: {message}\n")
        return
    show_other(message, category, filename, lineno, file, line)


def interrupt_while_starting(signum: int, frame: object) -> None:
    """The SIGINT handler until a command runs: ignore further SIGINTs, write
    ``convcrf: error: interrupted`` and exit with status 130 at once, raising nothing into the
    code that was running. The line goes to stderr's file descriptor: ``sys.stderr`` may be in
    the middle of a write that the signal interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _flush_streams()
    with contextlib.suppress(OSError):
        os.write(2, b"convcrf: error: interrupted\n")
    os._exit(130)


def command_started() -> None:
    """A command's own code begins: its first Ctrl-C raises ``KeyboardInterrupt`` from now on
    (:func:`interrupt_once`), where :func:`main` installed its handler (not under Click's
    test runner, whose SIGINT handler is left as it is)."""
    if signal.getsignal(signal.SIGINT) is interrupt_while_starting:
        signal.signal(signal.SIGINT, interrupt_once)


def interrupt_once(signum: int, frame: object) -> None:
    """The SIGINT handler while a command runs: ignore further SIGINTs, then raise
    ``KeyboardInterrupt``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _cannot_start(exc: ImportError | MemoryError | OSError) -> NoReturn:
    reason = "out of memory" if isinstance(exc, MemoryError) else str(exc)
    sys.stderr.write(
        f"convcrf: error: cannot start: loading torch and NumPy failed ({reason}); is the "
        "process's memory limited (ulimit -v)?\n"
    )
    _exit_now(1)
