"""The ``convcrf`` command's entry point (``python -m convcrf_cli`` too).

Ctrl-C stops a command once: the first SIGINT raises ``KeyboardInterrupt``, which the commands
report as ``convcrf: error: interrupted`` with exit status 130, and later ones are ignored
while the command stops (a second Ctrl-C broke the shutdown of a batch's worker threads and
aborted the process). A Ctrl-C while the commands' modules (torch) are still being imported
gives the same line and status instead of a traceback, and a failure to load torch (too little
memory under ``ulimit -v``, a broken install) is one line with exit status 1. An interrupted or
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
from collections.abc import Callable
from typing import NoReturn, TextIO


def main() -> None:
    """Run the ``convcrf`` command group on ``sys.argv``."""
    signal.signal(signal.SIGINT, interrupt_once)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    warnings.showwarning = functools.partial(show_warning, warnings.showwarning)
    try:
        from convcrf_cli.cli import main as command_group
    except KeyboardInterrupt:
        _interrupted()
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
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


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


def interrupt_once(signum: int, frame: object) -> None:
    """The SIGINT handler: ignore further SIGINTs, then raise ``KeyboardInterrupt``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _cannot_start(exc: ImportError | MemoryError | OSError) -> NoReturn:
    reason = "out of memory" if isinstance(exc, MemoryError) else str(exc)
    sys.stderr.write(
        f"convcrf: error: cannot start: loading torch and NumPy failed ({reason}); is the "
        "process's memory limited (ulimit -v)?\n"
    )
    _exit_now(1)


def _interrupted() -> NoReturn:
    # Not sys.exit: a KeyboardInterrupt that passed through code run by PyRun_* during torch's
    # import marks the interpreter, which then ends itself with SIGINT (status -2) on exit.
    sys.stderr.write("convcrf: error: interrupted\n")
    _exit_now(130)
