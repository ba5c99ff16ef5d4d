"""Reading images and label maps with Pillow, with one-line errors that name the file.

Decisions (see README):

- Values stay in their raw range: ``uint8`` for 8-bit images, ``uint16`` for 16-bit grayscale,
  ``float32`` for floating-point TIFFs. ``--col-schan`` is in these units. Pillow reads 16-bit
  colour PNGs as 8-bit RGB and 16-bit grayscale PNGs with alpha as 8-bit (one channel here).
- Grayscale gives one feature channel, colour three. Palette images become RGB.
- Alpha is dropped: the colour values are used as stored, never composited on a background
  (a note says so). Other modes (CMYK, YCbCr, ...) are converted to RGB.
- EXIF orientation is applied (as ``ImageOps.exif_transpose`` does): images are used as
  viewers and ``cv2.imread`` show them, and the unary must be in that orientation. With
  ``apply_exif=False`` the pixels are used as stored, also for TIFFs that Pillow turns while
  decoding. Either way :class:`LoadedImage` records the tag so that the caller can check the
  unary against both orientations and warn when the check cannot tell.
- Multi-frame files (TIFF pages, animated WebP) give their first frame (a note says so).
- Floating-point images holding NaN or infinite values are refused.
- Images with more than :func:`max_pixels` pixels are refused from their header, before any
  decoding (decompression bombs included). ``CONVCRF_MAX_PIXELS`` lowers the limit (read when
  an image is opened; a value that is not a positive integer is an error then); Pillow's own
  ceiling (twice ``PIL.Image.MAX_IMAGE_PIXELS``, the default here) still applies above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from convcrf_cli.errors import BadInputError, input_status, unreadable

MAX_PIXELS_VARIABLE = "CONVCRF_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
"""Largest image (height × width) read when ``CONVCRF_MAX_PIXELS`` is not set."""

EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_NAMES = {
    2: "mirrored horizontally",
    3: "rotated 180°",
    4: "mirrored vertically",
    5: "transposed",
    6: "rotated 90° clockwise",
    7: "transversed",
    8: "rotated 90° counter-clockwise",
}
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""The transpose that shows stored pixels in each EXIF orientation (as viewers do)."""
_UNDO_TRANSPOSES = {
    **_TRANSPOSES,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
"""The transpose back from shown to stored pixels (the flips and half turns undo themselves)."""
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PILLOW_TURNS_TIFFS_KEEPING_THE_TAG = tuple(map(int, PIL.__version__.split(".")[:2])) < (10, 1)
"""Pillow before 10.1 turns TIFFs to their orientation while decoding but keeps the tag."""


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """A decoded image.

    pixels: ``[H,W,F]`` raw values, ``uint8``, ``uint16`` or ``float32`` (F = 1 or 3).
    exif_orientation: the file's EXIF orientation tag (1 when absent).
    exif_applied: whether ``pixels`` are in the orientation the tag describes.
    stored_hw: ``(H, W)`` of the pixels as stored in the file, before any orientation.
    notes: what was done to the file's contents (alpha dropped, frames skipped, ...).
    """

    pixels: np.ndarray
    exif_orientation: int
    exif_applied: bool
    stored_hw: tuple[int, int]
    notes: tuple[str, ...]

    @property
    def orientation_name(self) -> str:
        """Words for the EXIF orientation, e.g. ``"rotated 90° clockwise"``."""
        return _ORIENTATION_NAMES.get(self.exif_orientation, "as stored")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``[H,W,F]`` raw values (``uint8``/``uint16``/``float32``), EXIF applied.

    Raises :class:`BadInputError` naming the file when it is missing, unreadable, corrupt or
    too large, :class:`~convcrf_cli.errors.RuntimeFailure` when the machine could not read it
    (too many open files, no memory, an I/O error).
    """
    return load_image(path).pixels


def load_image(path: str | Path, *, apply_exif: bool = True) -> LoadedImage:
    """Read an image with the details of how it was read (see :class:`LoadedImage`)."""
    with _open(path) as image:
        notes: list[str] = []
        frames = _frame_count(path, image)
        if frames > 1:
            notes.append(f"{frames} frames; using the first")
        png_16_bit = _png_16_bit_raw_mode(image)  # before getexif(), which may decode
        orientation = _exif_orientation(image)
        _decode(path, image)
        if png_16_bit == "LA":  # Pillow decodes it as 8-bit RGBA with three equal channels
            image = image.getchannel("R")
            notes.append(
                "16-bit grayscale PNG with alpha: Pillow reads 8 bits (values 0–255, "
                "--col-schan in these units); alpha dropped"
            )
        elif png_16_bit in ("RGB", "RGBA"):
            notes.append(
                "16-bit colour PNG: Pillow reads 8 bits (values 0–255, --col-schan in these units)"
            )
        # Pillow turns TIFFs to their orientation while decoding (and from 10.1 drops the tag)
        shown_by_pillow = orientation != 1 and (
            _exif_orientation(image) == 1
            or (_PILLOW_TURNS_TIFFS_KEEPING_THE_TAG and image.format == "TIFF")
        )
        if apply_exif and orientation != 1 and not shown_by_pillow:
            image = image.transpose(_TRANSPOSES[orientation])
        elif not apply_exif and shown_by_pillow:
            image = image.transpose(_UNDO_TRANSPOSES[orientation])
        stored_hw = (image.height, image.width)
        if apply_exif and orientation in (5, 6, 7, 8):
            stored_hw = (image.width, image.height)
        pixels = _pixels(path, image, notes)
    return LoadedImage(pixels, orientation, apply_exif, stored_hw, tuple(notes))


def max_pixels() -> int:
    """Largest image (height × width) read: ``CONVCRF_MAX_PIXELS`` if set, else
    :data:`DEFAULT_MAX_PIXELS`. A set value that is not a positive integer is a
    :class:`BadInputError` naming the variable."""
    text = os.environ.get(MAX_PIXELS_VARIABLE)
    if text is None:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise BadInputError(
            MAX_PIXELS_VARIABLE, f"must be a positive whole number of pixels, got {text!r}"
        )
    return limit


def read_label_image(path: str | Path) -> np.ndarray:
    """Read a label map as ``[H,W] int64`` class ids.

    Palette PNGs give their palette indices, grayscale images their values (8 or 16 bit).
    Label maps are read as stored: a colour image, or one whose EXIF orientation tag would
    rotate it, is refused.
    """
    with _open(path) as image:
        orientation = _exif_orientation(image)
        if orientation != 1:
            raise BadInputError(
                path,
                f"label map carries EXIF orientation {orientation} "
                f"({_ORIENTATION_NAMES[orientation]}); label maps are read as stored pixels, "
                "remove the tag",
            )
        if image.mode not in ("P", "L", "1", "I", *_SIXTEEN_BIT_MODES):
            raise BadInputError(
                path,
                "label map must be a palette or grayscale image of class ids, "
                f"got mode {image.mode}",
            )
        _decode(path, image)
        return np.asarray(image).astype(np.int64)


def check_label_size(
    name: str | Path, labels: np.ndarray, image_hw: tuple[int, int], hint: str = ""
) -> None:
    """Refuse a label map ``[H,W]`` whose size differs from the image's, naming ``name``
    (``hint``, if given, follows the problem after a semicolon)."""
    if labels.shape != tuple(image_hw):
        raise BadInputError(
            name,
            f"label map is {labels.shape[0]}×{labels.shape[1]} but the image is "
            f"{image_hw[0]}×{image_hw[1]}" + (f"; {hint}" if hint else ""),
        )


@contextlib.contextmanager
def _open(path: str | Path) -> Iterator[Image.Image]:
    """Open lazily (header only) and refuse images over :func:`max_pixels`.

    The image is opened from a file object, which Pillow never memory-maps: its memory map
    of an uncompressed grayscale TIFF turned 90° by its orientation tag has the turned size
    and scrambles the pixels (Pillow 13).
    """
    path = Path(path)
    limit = max_pixels()
    status = input_status(path)
    if status is None:
        raise BadInputError(path, "no such file")
    if stat.S_ISDIR(status.st_mode):
        raise BadInputError(path, "is a directory, not an image")
    try:
        handle = open(path, "rb")  # closed by the with block below
    except OSError as exc:
        raise unreadable(path, exc) from exc
    with handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(handle)
        except Image.DecompressionBombError as exc:
            raise BadInputError(path, f"image too large: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise BadInputError(path, "not an image format Pillow can read (corrupt?)") from exc
        except ValueError as exc:  # a damaged header, e.g. a PNG's 'Truncated IHDR chunk'
            raise _corrupt(path, exc) from exc
        except OSError as exc:
            raise unreadable(path, exc) from exc
        with image:
            width, height = image.size
            if width * height > limit:
                raise BadInputError(
                    path,
                    f"image too large: {height}×{width} = {width * height} pixels, more than "
                    f"the limit of {limit} ({MAX_PIXELS_VARIABLE})",
                )
            yield image


_CORRUPT_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError)
"""What Pillow raises for damaged image data (its plugins' parsing errors, unwrapped)."""


def _decode(path: str | Path, image: Image.Image) -> None:
    """Decode the pixel data now, so that corrupt or truncated data is reported here."""
    try:
        image.load()
    except MemoryError as exc:
        raise BadInputError(path, "image too large for the memory of this machine") from exc
    except _CORRUPT_ERRORS as exc:
        raise _corrupt(path, exc) from exc


def _corrupt(path: str | Path, exc: Exception) -> BadInputError:
    """The error for damaged image data at ``path`` that Pillow raised as ``exc``."""
    detail = f"no entry {exc}" if isinstance(exc, KeyError) else str(exc)
    return BadInputError(path, f"corrupt or truncated image data ({detail})")


def _frame_count(path: str | Path, image: Image.Image) -> int:
    """The number of frames (TIFF pages, GIF/WebP/APNG frames) of ``image``, opened, not
    decoded. Pillow reads every frame's header to count them, so a damaged later frame is
    reported here, naming the file."""
    try:
        return getattr(image, "n_frames", 1)
    except _CORRUPT_ERRORS as exc:
        raise _corrupt(path, exc) from exc


def _png_16_bit_raw_mode(image: Image.Image) -> str | None:
    """The stored mode (``"LA"``, ``"RGB"``, ``"RGBA"``, ...) of a 16-bit PNG, else ``None``;
    ``image`` opened, not decoded. Pillow decodes 16-bit PNGs other than grayscale to 8 bits."""
    if image.format != "PNG" or not image.tile:
        return None
    raw_mode = image.tile[0][3]  # the tile's decoder arguments: the raw mode for PNG
    if not isinstance(raw_mode, str) or ";16" not in raw_mode:
        return None
    return raw_mode.split(";")[0]


def _exif_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block is no orientation at all
        return 1
    return value if value in _ORIENTATION_NAMES else 1


def _pixels(path: str | Path, image: Image.Image, notes: list[str]) -> np.ndarray:
    """``[H,W,F]`` array of a decoded image, alpha dropped, values in their raw range."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        notes.append(f"alpha channel dropped (mode {mode}); colours used as stored")
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image)
        if mode == "F" and not np.isfinite(values).all():
            raise BadInputError(path, "image holds NaN or infinite values")
        low, high = values.min(), values.max()
        in_uint16 = mode != "F" and low >= 0 and high <= np.iinfo(np.uint16).max
        values = values.astype(np.uint16 if in_uint16 else np.float32)
        kind = "floating-point" if mode == "F" else "16-bit"
        if mode == "I" and image.format != "PNG":  # older Pillow opens 16-bit PNGs as "I"
            kind = "integer"  # 32-bit, or signed 16-bit (Pillow reads both as "I")
        notes.append(f"{kind} grayscale values {low}..{high}: --col-schan is in these units")
        return values[:, :, None]
    if mode in ("L", "LA", "La", "1"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    if mode == "P":
        return np.asarray(image.convert("RGBA").convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
