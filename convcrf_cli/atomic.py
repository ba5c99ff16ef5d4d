"""Atomic file output: write to a temporary name in the target directory, then rename
(through symlinks: the link's target is what is replaced).

:func:`staged_outputs` does this for several files at once: each is written under a temporary
name, and all are renamed only when every one was written, so that a failure leaves none.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class StagedFiles:
    """Files written under temporary names, to be renamed together by :meth:`commit`."""

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path]] = []

    @contextlib.contextmanager
    def output(self, path: Path) -> Iterator[BinaryIO]:
        """Yield a binary file that is staged for ``path`` if the block finishes without error.

        On any exception the temporary file is removed and ``path`` is left untouched. A
        symlink is written through: its target is replaced and the link kept.
        """
        path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            _remove(tmp_name)
            raise
        self._staged.append((tmp_name, path))

    def commit(self) -> None:
        """Rename every staged file to its path. If a rename fails, the files already renamed
        and the temporary files left are removed, and the error is raised."""
        renamed: list[Path] = []
        try:
            for tmp_name, path in self._staged:
                os.replace(tmp_name, path)
                renamed.append(path)
        except BaseException:
            for path in renamed:
                _remove(path)
            self.discard()
            raise
        self._staged.clear()

    def discard(self) -> None:
        """Remove the staged temporary files."""
        for tmp_name, _ in self._staged:
            _remove(tmp_name)
        self._staged.clear()


@contextlib.contextmanager
def staged_outputs() -> Iterator[StagedFiles]:
    """Yield a :class:`StagedFiles`; commit it if the block finishes, discard it otherwise."""
    staged = StagedFiles()
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
    staged.commit()


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block finishes without error.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    with staged_outputs() as staged, staged.output(path) as handle:
        yield handle


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as handle:
        handle.write(data)


def _remove(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_npy(handle: BinaryIO, array: np.ndarray) -> None:
    """``np.save(handle, array)`` through ``handle.write`` in chunks, so that a failed write
    (a full disk) raises an :class:`OSError` with its reason: NumPy's own path for real files
    (``fwrite``) reports only how many bytes were written."""
    np.lib.format.write_array(_Writes(handle), np.asanyarray(array), allow_pickle=False)


class _Writes:
    """A file that only writes, which :func:`numpy.lib.format.write_array` fills chunk by chunk."""

    def __init__(self, handle: BinaryIO) -> None:
        self.write = handle.write
