"""Writing results: label maps, refined probabilities and colour overlays.

Every file is written through :mod:`convcrf_cli.atomic` (temporary name, then rename), so an
error never leaves a partial file. ``-`` as the label path writes the PNG to stdout, encoded
in full before the first byte goes out.

- Labels ``.png``: palette PNG (mode ``P``, Pascal VOC colours) whose pixel values are the
  class ids; at most 256 classes. Labels ``.npy``: ``[H,W] int32``.
- Probabilities ``.npy``: ``softmax`` of the refined scores, float16 or float32, in the layout
  of the input unary (``[C,H,W]`` or ``[H,W,C]``; ``[C,H,W]`` for a label-map unary).
- Overlay: the palette colour of each label blended over the image with weight ``alpha``;
  any format Pillow writes from the suffix (``.png``, ``.jpg``, ``.webp``, ...).
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from convcrf_cli.atomic import atomic_output
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.palette import palette_bytes, voc_palette

STDOUT = "-"
LABEL_SUFFIXES = (".png", ".npy")
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
    """Validate ``spec`` without touching the disk: formats, options, no output over an input.

    Raises :class:`BadInputError` naming the offending path.
    """
    labels_suffix = Path(spec.labels).suffix.lower()
    if str(spec.labels) != STDOUT and labels_suffix not in LABEL_SUFFIXES:
        raise BadInputError(spec.labels, "label output must be .png, .npy or - (PNG on stdout)")
    if spec.probs is not None and Path(spec.probs).suffix.lower() != ".npy":
        raise BadInputError(spec.probs, "probabilities are written as .npy")
    if spec.probs_dtype not in PROBS_DTYPES:
        raise BadInputError(None, f"probabilities dtype must be one of {', '.join(PROBS_DTYPES)}")
    if not 0.0 <= spec.alpha <= 1.0:
        raise BadInputError(None, f"overlay alpha must lie in [0, 1], got {spec.alpha}")
    for path in (spec.overlay, spec.probs):
        if path is not None and str(path) == STDOUT:
            raise BadInputError(None, "only the label output (-o) can go to stdout")
    if spec.overlay is not None:
        try:
            Image.registered_extensions()[Path(spec.overlay).suffix.lower()]
        except KeyError:
            raise BadInputError(
                spec.overlay, "unknown image format for the overlay (use .png, .jpg, ...)"
            ) from None
    paths = spec.paths()
    input_paths = {_identity(p) for p in inputs if str(p) != STDOUT}
    seen: set[Path] = set()
    for path in paths:
        identity = _identity(path)
        if identity in input_paths:
            raise BadInputError(path, "output would overwrite an input file")
        if identity in seen:
            raise BadInputError(path, "given for two outputs")
        seen.add(identity)
        if path.is_dir():
            raise BadInputError(path, "is a directory; give a file name")


def check_class_count(spec: OutputSpec, num_classes: int) -> None:
    """Refuse more than 256 classes when a PNG label map or overlay is asked for."""
    labels_png = str(spec.labels) == STDOUT or Path(spec.labels).suffix.lower() == ".png"
    if num_classes > PNG_MAX_CLASSES and (labels_png or spec.overlay is not None):
        what = "PNG label map" if labels_png else "overlay"
        raise BadInputError(
            spec.overlay if not labels_png else spec.labels,
            f"{num_classes} classes do not fit a {what} (at most {PNG_MAX_CLASSES}); "
            "write the labels as .npy",
        )


def prepare_directories(spec: OutputSpec) -> None:
    """Create the output directories and check that they are writable."""
    for path in spec.paths():
        directory = path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(
                path, f"cannot create directory {directory}: {exc.strerror}"
            ) from exc
        if not os.access(directory, os.W_OK | os.X_OK):
            raise BadInputError(path, f"directory {directory} is not writable")


def write_labels(path: str | Path, labels: np.ndarray) -> None:
    """Write ``[H,W]`` integer class ids to ``.png`` (palette), ``.npy`` (int32) or ``-``."""
    if str(path) == STDOUT:
        _write_stdout(_palette_png(path, labels))
        return
    if Path(path).suffix.lower() == ".npy":
        _write(path, lambda handle: np.save(handle, labels.astype(np.int32)))
    else:
        data = _palette_png(path, labels)
        _write(path, lambda handle: handle.write(data))


def write_probabilities(path: str | Path, probs: np.ndarray, layout: str, dtype: str) -> None:
    """Write ``[C,H,W]`` probabilities to ``.npy`` in ``layout`` (``HWC``: ``[H,W,C]``)."""
    if dtype not in PROBS_DTYPES:
        raise BadInputError(path, f"probabilities dtype must be one of {', '.join(PROBS_DTYPES)}")
    array = np.moveaxis(probs, 0, -1) if layout == "HWC" else probs
    array = np.ascontiguousarray(array, dtype=dtype)
    _write(path, lambda handle: np.save(handle, array))


def write_overlay(path: str | Path, image: np.ndarray, labels: np.ndarray, alpha: float) -> None:
    """Blend the palette colours of ``labels [H,W]`` over ``image [H,W,F]`` (``[H,W]`` too).

    The image is shown as 8-bit RGB: 8-bit values as they are, 16-bit divided by 257, floats
    stretched from their minimum to their maximum; one channel is grey, three are RGB, other
    counts show the first channel as grey.
    """
    if labels.max(initial=0) >= PNG_MAX_CLASSES:
        raise BadInputError(path, f"labels above {PNG_MAX_CLASSES - 1} have no overlay colour")
    colours = voc_palette()[labels].astype(np.float32)
    blended = (1.0 - alpha) * _display_rgb(image) + alpha * colours
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    suffix = Path(path).suffix.lower()
    try:
        picture.save(buffer, format=Image.registered_extensions()[suffix])
    except (KeyError, OSError, ValueError) as exc:
        raise BadInputError(path, f"cannot encode the overlay as {suffix}: {exc}") from exc
    _write(path, lambda handle: handle.write(buffer.getvalue()))


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
    picture = Image.fromarray(labels.astype(np.uint8))
    picture.putpalette(palette_bytes())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_stdout(data: bytes) -> None:
    """Write ``data`` to stdout; a reader that closed the pipe is a runtime failure."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError as exc:
        # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise RuntimeFailure(
            "stdout: the reader closed the pipe before the PNG was written"
        ) from exc


def _write(path: str | Path, fill) -> None:
    """Write through :func:`atomic_output`; OS errors become :class:`RuntimeFailure`."""
    try:
        with atomic_output(Path(path)) as handle:
            fill(handle)
    except OSError as exc:
        raise RuntimeFailure(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _identity(path: str | Path) -> Path:
    return Path(path).resolve()
