"""Writing results: label maps, refined probabilities and colour overlays.

Every file is written through :mod:`convcrf_cli.atomic` (temporary name, then rename), so an
error never leaves a partial file; :func:`write_outputs` renames the files of one item only when
all were written, so that a failure leaves none of them. ``-`` as the label path writes the PNG
to stdout, encoded in full before the first byte goes out.

- Labels ``.png``: palette PNG (mode ``P``, Pascal VOC colours) whose pixel values are the
  class ids; at most 256 classes. Labels ``.npy``: ``[H,W] int32``.
- Probabilities ``.npy``: ``softmax`` of the refined scores, float16 or float32, in the layout
  of the input unary (``[C,H,W]`` or ``[H,W,C]``; ``[C,H,W]`` for a label-map unary).
- Overlay: the palette colour of each label blended over the image with weight ``alpha``;
  any format Pillow writes RGB images in, from the suffix (``.png``, ``.jpg``, ``.webp``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from convcrf_cli.atomic import StagedFiles, atomic_output, staged_outputs, write_npy
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.palette import palette_png, voc_palette
from convcrf_cli.params import FLOAT32_TINY
from convcrf_cli.underflow import EXP_CUTOFF

STDOUT = "-"
LABEL_OUTPUT_SUFFIXES = (".png", ".npy")
PROBS_DTYPES = ("float16", "float32")
PNG_MAX_CLASSES = 256


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Where one item's results go.

    labels: label map path (``.png``/``.npy``) or ``"-"`` for a PNG on stdout.
    overlay: colour overlay path, or None.
    probs: refined probabilities ``.npy`` path, or None.
    probs_dtype: ``"float16"`` or ``"float32"``.
    alpha: overlay opacity of the label colours, in [0, 1].
    """

    labels: str | Path
    overlay: str | Path | None = None
    probs: str | Path | None = None
    probs_dtype: str = "float32"
    alpha: float = 0.5

    def paths(self) -> list[Path]:
        """The output files (stdout excluded)."""
        named = (self.labels, self.overlay, self.probs)
        return [Path(p) for p in named if p is not None and str(p) != STDOUT]


def check_outputs(spec: OutputSpec, inputs: list[str | Path]) -> None:
    """Validate ``spec`` before any work: formats, options, no output over an input, each
    output a file name in a directory that exists or can be created, writable (see
    :func:`check_output_file`). Creates nothing.

    Raises :class:`BadInputError` naming the offending path, or :class:`RuntimeFailure` when
    the labels go to stdout and stdout is closed.
    """
    labels_suffix = Path(spec.labels).suffix.lower()
    if str(spec.labels) == STDOUT:
        _check_stdout()
    elif labels_suffix not in LABEL_OUTPUT_SUFFIXES:
        raise BadInputError(spec.labels, "label output must be .png, .npy or - (PNG on stdout)")
    for path in (spec.overlay, spec.probs):
        if path is not None and str(path) == STDOUT:
            raise BadInputError(None, "only the label output (-o) can go to stdout")
    if spec.probs is not None and Path(spec.probs).suffix.lower() != ".npy":
        raise BadInputError(spec.probs, "probabilities are written as .npy")
    if spec.probs_dtype not in PROBS_DTYPES:
        raise BadInputError(None, f"probabilities dtype must be one of {', '.join(PROBS_DTYPES)}")
    if not 0.0 <= spec.alpha <= 1.0:
        raise BadInputError(None, f"overlay alpha must lie in [0, 1], got {spec.alpha}")
    if spec.overlay is not None:
        _encode_overlay(spec.overlay, Image.new("RGB", (1, 1)))  # refuses formats Pillow lacks
    paths = spec.paths()
    input_paths = {real_path(p) for p in inputs if str(p) != STDOUT}
    seen: set[Path] = set()
    for path in paths:
        identity = real_path(path)
        if identity in input_paths:
            raise BadInputError(path, "output would overwrite an input file")
        if identity in seen:
            raise BadInputError(path, "given for two outputs")
        seen.add(identity)
        check_output_file(path)


def check_class_count(spec: OutputSpec, num_classes: int) -> None:
    """Refuse more than 256 classes when a PNG label map or overlay is asked for."""
    if num_classes <= PNG_MAX_CLASSES:
        return
    if str(spec.labels) == STDOUT or Path(spec.labels).suffix.lower() == ".png":
        raise BadInputError(
            spec.labels,
            f"{num_classes} classes do not fit a PNG label map (at most {PNG_MAX_CLASSES}); "
            "write the labels as .npy",
        )
    if spec.overlay is not None:
        raise BadInputError(
            spec.overlay,
            f"{num_classes} classes do not fit an overlay (at most {PNG_MAX_CLASSES} colours); "
            "leave the overlay out",
        )


def missing_directories(paths: Iterable[Path]) -> list[Path]:
    """The directories above ``paths`` that do not exist yet, deepest first."""
    missing: set[Path] = set()
    seen: set[Path] = set()
    for path in paths:
        for directory in Path(path).parents:
            if directory in seen:
                break
            seen.add(directory)
            if os.path.exists(directory):  # False where it cannot be looked at
                break
            missing.add(directory)
    return sorted(missing, key=lambda directory: len(directory.parts), reverse=True)


def remove_empty_directories(directories: list[Path]) -> None:
    """Remove those of ``directories`` (deepest first) that exist and are empty."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _create_directories(spec: OutputSpec) -> None:
    """Create the output directories (:func:`check_outputs` has checked that they can be)."""
    for path in spec.paths():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeFailure(
                f"{path}: cannot create directory {path.parent}: {exc.strerror}"
            ) from exc


def check_output_file(path: Path) -> None:
    """Raise :class:`BadInputError` naming ``path`` unless it can be written: not a directory
    nor a device, FIFO or socket, in a directory :func:`check_output_directory` accepts (for
    a symlink, its target's). Creates nothing: the writer makes the missing directories."""
    path = Path(path)
    with _checking(path):
        if path.is_dir():
            raise BadInputError(path, "is a directory; give a file name")
        if path.exists() and not path.is_file():
            raise BadInputError(
                path, "is a device, FIFO or socket, not a file: outputs are files (stdout is -)"
            )
        target = real_path(path) if path.is_symlink() else path
    check_output_directory(target.parent, path)


def check_output_directory(directory: Path, named: Path | None = None) -> None:
    """Raise :class:`BadInputError` naming ``named`` (default: ``directory``) unless
    ``directory`` is a writable directory or can be created (its nearest existing ancestor is
    a writable directory). Creates nothing."""
    with _checking(named or directory):
        existing = next((d for d in (directory, *directory.parents) if d.exists()), directory)
        problem = "" if named is None else f"directory {directory} "
        if existing != directory:
            problem += f"cannot be created: {existing} "
        if not existing.is_dir():
            raise BadInputError(named or directory, f"{problem}is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(named or directory, f"{problem}is not writable")


@contextlib.contextmanager
def _checking(path: Path) -> Iterator[None]:
    """Turn the OS errors of looking at an output (a name too long, a directory on the way
    that may not be searched, a symlink loop: ``Path.exists`` raises them before Python
    3.12) into a :class:`BadInputError` naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise BadInputError(path, f"cannot write: {exc.strerror or exc}") from exc


def write_outputs(
    spec: OutputSpec,
    image: np.ndarray,
    scores: np.ndarray | None,
    labels: np.ndarray,
    layout: str,
) -> list[str]:
    """Write every output ``spec`` names, all or none; return their paths (``"-"`` for stdout).

    image: ``[H,W,F]`` (for the overlay). scores: the refined ``[C,H,W] float32`` scores, whose
    softmax over classes is written as the probabilities, in ``layout`` (may be None when
    ``spec`` writes no probabilities). labels: ``[H,W]`` class ids (the argmax of the scores).
    Missing directories are created first. The files are written under temporary names and
    renamed once all were written (and the PNG went to stdout); if anything fails, none is
    left. A failing rename removes the outputs already renamed.
    """
    written: list[str] = []
    _create_directories(spec)
    try:
        with staged_outputs() as staged:
            if str(spec.labels) != STDOUT:
                write_labels(spec.labels, labels, staged=staged)
            written.append(str(spec.labels))
            if spec.probs is not None:
                probs = _softmax(scores)
                write_probabilities(spec.probs, probs, layout, spec.probs_dtype, staged=staged)
                written.append(str(spec.probs))
            if spec.overlay is not None:
                write_overlay(spec.overlay, image, labels, spec.alpha, staged=staged)
                written.append(str(spec.overlay))
            if str(spec.labels) == STDOUT:
                write_labels(STDOUT, labels)
    except OSError as exc:  # a rename failed: os.replace names the target second
        raise RuntimeFailure(
            f"{exc.filename2 or exc.filename}: cannot write: {exc.strerror or exc}"
        ) from exc
    return written


def write_labels(
    path: str | Path, labels: np.ndarray, *, staged: StagedFiles | None = None
) -> None:
    """Write ``[H,W]`` integer class ids to ``.png`` (palette), ``.npy`` (int32) or ``-``.

    staged: stage the file there (see :mod:`convcrf_cli.atomic`) instead of renaming it now.
    """
    if str(path) == STDOUT:
        _write_stdout(_palette_png(path, labels))
        return
    if Path(path).suffix.lower() == ".npy":
        _write(path, lambda handle: write_npy(handle, labels.astype(np.int32)), staged)
    else:
        data = _palette_png(path, labels)
        _write(path, lambda handle: handle.write(data), staged)


def write_probabilities(
    path: str | Path,
    probs: np.ndarray,
    layout: str,
    dtype: str,
    *,
    staged: StagedFiles | None = None,
) -> None:
    """Write ``[C,H,W]`` probabilities to ``.npy`` in ``layout`` (``HWC``: ``[H,W,C]``).

    staged: as for :func:`write_labels`.
    """
    if dtype not in PROBS_DTYPES:
        raise BadInputError(path, f"probabilities dtype must be one of {', '.join(PROBS_DTYPES)}")
    array = np.moveaxis(probs, 0, -1) if layout == "HWC" else probs
    array = np.ascontiguousarray(array, dtype=dtype)
    _write(path, lambda handle: write_npy(handle, array), staged)


def write_overlay(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    alpha: float,
    *,
    staged: StagedFiles | None = None,
) -> None:
    """Blend the palette colours of ``labels [H,W]`` over ``image [H,W,F]`` (``[H,W]`` too).

    The image is shown as 8-bit RGB: 8-bit values as they are, 16-bit divided by 257, floats
    stretched from their minimum to their maximum; one channel is grey, two show the first as
    grey, three or more show the first three as RGB. staged: as for :func:`write_labels`.
    """
    if labels.max(initial=0) >= PNG_MAX_CLASSES:
        raise BadInputError(path, f"labels above {PNG_MAX_CLASSES - 1} have no overlay colour")
    colours = voc_palette()[labels].astype(np.float32)
    blended = (1.0 - alpha) * _display_rgb(image) + alpha * colours
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    data = _encode_overlay(path, picture)
    _write(path, lambda handle: handle.write(data), staged)


def _softmax(scores: np.ndarray) -> np.ndarray:
    """``[C,H,W] float32`` softmax over classes (NumPy: it runs in I/O worker threads, where
    torch's own thread pool would compete with the CRF's). Probabilities below the normal
    float32 range are written as 0, as the CRF computes them (:mod:`convcrf_cli.denormals`):
    computing them as denormal numbers made this 2x slower on confident outputs, and they
    would slow down whatever reads the file. Scores more than 87 below a pixel's best
    (:data:`~convcrf_cli.underflow.EXP_CUTOFF`) are flushed before ``exp``; the normalisation
    (a division by up to C) can still push a value below the range, so the quotients are
    flushed too."""
    shifted = scores - scores.max(axis=0, keepdims=True)
    np.copyto(shifted, -np.inf, where=shifted < EXP_CUTOFF)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    np.copyto(shifted, 0.0, where=shifted < FLOAT32_TINY)
    return shifted


_ICON_FORMATS = ("ICO", "ICNS")
"""Formats Pillow writes as icons of fixed sizes instead of the image."""
_LARGEST_SIDE = {"WEBP": 16383, "JPEG": 65500, "GIF": 65535}
"""Pixels a side that the overlay formats with a limit hold (WebP, libjpeg, GIF)."""


def check_overlay_size(spec: OutputSpec, image_hw: tuple[int, int]) -> None:
    """Refuse an overlay format that cannot hold an image of ``image_hw`` (checked before
    the CRF runs)."""
    if spec.overlay is None:
        return
    image_format = _overlay_format(spec.overlay)
    largest = _LARGEST_SIDE.get(image_format)
    if largest is not None and max(image_hw) > largest:
        raise BadInputError(
            spec.overlay,
            f"{image_format} holds at most {largest} pixels a side, the image is "
            f"{image_hw[0]}×{image_hw[1]}; use .png or .tif for the overlay",
        )


def _overlay_format(path: str | Path) -> str:
    """Pillow's format for the overlay file ``path``, by its suffix."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())
    if image_format is None:
        raise BadInputError(path, "unknown image format for the overlay (use .png, .jpg, ...)")
    if image_format in _ICON_FORMATS:
        raise BadInputError(
            path, f"{image_format} holds icons of fixed sizes, not the image; use .png, .jpg, ..."
        )
    return image_format


def _encode_overlay(path: str | Path, picture: Image.Image) -> bytes:
    """``picture`` (mode RGB) encoded in the format of ``path``'s suffix."""
    image_format = _overlay_format(path)
    buffer = io.BytesIO()
    try:
        picture.save(buffer, format=image_format)
    except KeyError:  # Pillow reads this format but has no writer for it
        raise BadInputError(
            path, f"Pillow cannot write {image_format} images; use .png, .jpg, ... for the overlay"
        ) from None
    except (OSError, ValueError) as exc:
        raise BadInputError(
            path, f"cannot write the overlay (RGB) as {image_format}: {exc} (use .png, .jpg, ...)"
        ) from exc
    return buffer.getvalue()


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """``[H,W,3] float32`` in 0..255 for showing ``image``."""
    values = image if image.ndim == 3 else image[:, :, None]
    values = values[:, :, :3] if values.shape[2] >= 3 else values[:, :, :1]
    if values.dtype == np.uint8:
        scaled = values.astype(np.float32)
    elif values.dtype == np.uint16:
        scaled = values.astype(np.float32) / 257.0
    else:
        values = values.astype(np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low) if high > low else 0.0)
    return np.broadcast_to(scaled, (*scaled.shape[:2], 3))


def _palette_png(path: str | Path, labels: np.ndarray) -> bytes:
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= PNG_MAX_CLASSES:
        raise BadInputError(
            path, f"labels outside 0..{PNG_MAX_CLASSES - 1} do not fit a PNG; write .npy"
        )
    return palette_png(labels)


def _check_stdout() -> None:
    """Refuse a closed stdout (Python sets ``sys.stdout`` to None when started without one)."""
    if sys.stdout is None:
        raise RuntimeFailure("stdout: closed; there is nowhere to write the PNG")


def _write_stdout(data: bytes) -> None:
    """Write ``data`` to stdout; a closed stdout, a reader that closed the pipe or any other
    write error (a full disk) is a runtime failure."""
    _check_stdout()
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as exc:
        raise stdout_failure(exc, "the PNG") from exc


def stdout_failure(exc: OSError, what: str) -> RuntimeFailure:
    """The :class:`RuntimeFailure` for ``exc``, raised writing ``what`` to stdout; points
    stdout at /dev/null first, so that the interpreter's final flush stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    problem = (
        f"the reader closed the pipe before {what} was written"
        if isinstance(exc, BrokenPipeError)
        else f"cannot write {what}: {exc.strerror or exc}"
    )
    return RuntimeFailure(f"stdout: {problem}")


def _write(
    path: str | Path, fill: Callable[[BinaryIO], object], staged: StagedFiles | None
) -> None:
    """Write through :func:`atomic_output`, or stage the file in ``staged``; OS errors become
    :class:`RuntimeFailure`."""
    opener = atomic_output if staged is None else staged.output
    try:
        with opener(Path(path)) as handle:
            fill(handle)
    except OSError as exc:
        raise RuntimeFailure(f"{path}: cannot write: {exc.strerror or exc}") from exc


def real_path(path: str | Path) -> Path:
    """The absolute path of ``path`` with its symlinks resolved as far as they lead (a symlink
    loop ends it, where ``Path.resolve`` raises RuntimeError before Python 3.13)."""
    return Path(os.path.realpath(path))
