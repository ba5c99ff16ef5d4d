"""Error types with exit statuses: 2 for bad usage or input, 1 for a runtime failure."""

from __future__ import annotations

import errno
import os
from pathlib import Path

OUT_OF_MEMORY_ADVICE = "try a larger --blur or a smaller image"
"""What to do when the CRF runs out of memory."""


class ConvCRFError(Exception):
    """Base of the errors the CLI reports as one line; ``exit_code`` is the process status."""

    exit_code = 1


class BadInputError(ConvCRFError):
    """An input file or argument is missing, unreadable or invalid (exit status 2)."""

    exit_code = 2

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class RuntimeFailure(ConvCRFError):
    """Inputs were valid but the computation or output failed (exit status 1)."""

    exit_code = 1


FILE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}
    | {errno.ENAMETOOLONG, errno.ENXIO}
)
"""``errno`` values that say the file itself cannot be read (missing, no permission)."""


def unreadable(path: str | Path, exc: OSError) -> ConvCRFError:
    """The error for an input ``path`` that could not be read: :class:`BadInputError` when
    the file is the problem (missing, no permission), :class:`RuntimeFailure` when the machine
    is (too many open files, no memory, an I/O error): the file may be fine."""
    reason = exc.strerror or str(exc)
    if exc.errno is None or exc.errno in FILE_ERRNOS:
        return BadInputError(path, f"cannot read: {reason}")
    return RuntimeFailure(f"{path}: cannot read: {reason}")


def input_status(path: str | Path) -> os.stat_result | None:
    """``os.stat(path)`` of an input, None when nothing is there (nor, for a missing
    directory on the way, could be). Any other fault (a directory on the way that may not be
    searched, a name too long, a symlink loop) is the error of :func:`unreadable`, as it is
    on every Python (``Path.exists`` raises some of them before Python 3.12)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise unreadable(path, exc) from exc
