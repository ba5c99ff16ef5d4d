"""Reading a unary (a segmenter's per-pixel class scores) and converting it to logits.

Sources: ``.npy``; ``.npz`` holding one array, or the array named ``unary``; ``-`` for ``.npy``
(or ``.npz``) bytes on stdin; a label image (``.png``, ``.tif``, ``.tiff``, ``.bmp``) of class ids.

Arrays are float16/32/64, ``[C,H,W]`` ("CHW") or ``[H,W,C]`` ("HWC"), with an optional
leading batch axis of size 1. The layout is found by matching ``(H, W)`` to the image; when
both layouts match (a square image with C = H = W) the caller must name it. A single channel
is a binary foreground score and becomes two classes (background, foreground); a
``num_classes`` given for it must be 2. Values must be finite in float32, the precision of
the CRF.

With ``resize="bilinear"`` a unary of another size is brought to the image's (see
:mod:`convcrf_cli.resize`): an array's logits bilinearly, after the conversion below; a label
map by nearest neighbour, before its conversion. A reading of the array with the image's size
still decides the layout; else the one whose ``(h, w)`` has the image's aspect ratio
(:func:`~convcrf_cli.resize.aspect_matches`); when both or neither have it, the caller must
name the layout, which then takes any size.

Unary types, all converted to logits whose softmax is the unary's distribution:

- ``prob``: probabilities; ``logits = log(max(p, PROB_EPS))``. Negative values or values
  above ``1 + AUTO_TOLERANCE`` are errors. One channel p: classes (1 - p, p).
- ``logit``: class scores used as they are. One channel z: classes (0, z) (a sigmoid logit).
- ``energy``: pydensecrf's energies ``E = -log p``; ``logits = -E``. Needs two or more classes.
- ``auto``: ``prob`` when every value lies in [0, 1] and the values of each pixel sum to 1
  within ``AUTO_TOLERANCE`` (for one channel: values in [0, 1]); ``logit`` otherwise.
  Energies are never guessed: a warning says when ``logit`` was chosen for values that look
  like energies.

Label images become logits as pydensecrf's ``unary_from_labels``: probability
``label_confidence`` on the pixel's label, the rest spread evenly over the other classes, and a
uniform distribution on pixels with the ``ignore_label``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import stat
import sys
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from convcrf_cli.errors import BadInputError, input_status, unreadable
from convcrf_cli.imageio import check_label_size, read_label_image
from convcrf_cli.resize import RESIZE_MODES, aspect_matches, resize_labels, resize_logits

UNARY_TYPES = ("auto", "prob", "logit", "energy")
LAYOUTS = ("auto", "CHW", "HWC")
LABEL_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
NPZ_KEY = "unary"
PROB_EPS = 1e-6
AUTO_TOLERANCE = 1e-2
DEFAULT_LABEL_CONFIDENCE = 0.7

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"  # a zip archive of no files starts with its end record
_RESIZE_HINT = "--resize-unary bilinear resizes a unary of another size to the image's"


@dataclasses.dataclass(frozen=True)
class Unary:
    """A unary converted to logits.

    logits: ``[C,H,W] float32`` class scores (softmax = the unary's distribution).
    layout: the source's layout, ``"CHW"``, ``"HWC"`` or ``"labels"`` (a label map).
    kind: the unary type used, ``"prob"``, ``"logit"``, ``"energy"`` or ``"labels"``.
    reason: why that kind and layout were chosen (for ``-v``).
    warnings: things the user should know even without ``-v``.
    notes: more details for ``-v`` (a resize, from which size to which).
    """

    logits: np.ndarray
    layout: str
    kind: str
    reason: str
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """C, the length of the class axis of :attr:`logits`."""
        return int(self.logits.shape[0])


@dataclasses.dataclass(frozen=True)
class UnarySource:
    """A unary as stored, before conversion.

    name: the source's name for messages (the path, or ``"stdin"``).
    array: the stored float array (any of the accepted shapes), or ``[H,W] int64`` labels; for
        an ``.npz`` member, a stand-in of its declared shape and dtype that holds no values
        (read-only, zero strides): :meth:`values` inflates the member.
    is_labels: whether ``array`` is a label map.
    inflate: reads the ``.npz`` member's values; ``None`` where ``array`` holds them.
    """

    name: str
    array: np.ndarray
    is_labels: bool
    inflate: Callable[[], np.ndarray] | None = None

    def values(self) -> np.ndarray:
        """``array`` with its values: the ``.npz`` member, inflated at each call, else ``array``."""
        return self.array if self.inflate is None else self.inflate()

    def fits(
        self, image_hw: tuple[int, int], *, layout: str = "auto", resize: str = "none"
    ) -> bool:
        """Whether a reading of the array (in ``layout``, or either for ``"auto"``) has the
        size ``image_hw``; with ``resize`` other than ``"none"``, its aspect ratio
        (:func:`~convcrf_cli.resize.aspect_matches`)."""
        sizes = self.spatial_sizes(layout)
        if resize == "none":
            return tuple(image_hw) in sizes
        return any(aspect_matches(size, image_hw) for size in sizes)

    def spatial_sizes(self, layout: str = "auto") -> tuple[tuple[int, int], ...]:
        """The ``(h, w)`` of each reading of the array that ``layout`` allows (both readings
        for ``"auto"``, CHW first); the label map's size; none for a shape of no layout."""
        shape = self.array.shape
        if self.is_labels:
            return (shape,)
        if len(shape) == 4 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 3:
            return ()
        return tuple(size for name, size in _readings(shape).items() if layout in ("auto", name))


def read_unary(
    source: str | Path,
    image_hw: tuple[int, int],
    unary_type: str = "auto",
    *,
    label_confidence: float = DEFAULT_LABEL_CONFIDENCE,
    ignore_label: int | None = None,
    num_classes: int | None = None,
    layout: str = "auto",
    resize: str = "none",
    stdin: BinaryIO | None = None,
) -> Unary:
    """Read ``source`` (a path or ``"-"`` for stdin) as logits ``[C,H,W] float32`` for an image
    of ``image_hw`` ``(H, W)``.

    ``unary_type`` is one of :data:`UNARY_TYPES`; ``layout`` one of :data:`LAYOUTS`;
    ``resize`` one of :data:`~convcrf_cli.resize.RESIZE_MODES`: ``"bilinear"`` brings a unary
    of another size to ``image_hw`` (see the module doc).
    ``label_confidence``, ``ignore_label`` and ``num_classes`` apply to label images
    (``num_classes`` defaults to the largest label + 1; for arrays it is checked against the
    number of classes, 2 for a single channel).
    ``stdin`` replaces ``sys.stdin.buffer`` for ``"-"``.
    Raises :class:`BadInputError` naming the source on any fault.
    """
    return convert_unary(
        load_unary(source, stdin),
        image_hw,
        unary_type,
        label_confidence=label_confidence,
        ignore_label=ignore_label,
        num_classes=num_classes,
        layout=layout,
        resize=resize,
    )


def load_unary(source: str | Path, stdin: BinaryIO | None = None) -> UnarySource:
    """Read a unary file, stdin (``"-"``) or label image without interpreting it."""
    if str(source) == "-":
        return _load_array(source, "stdin", stdin)
    if Path(source).suffix.lower() in LABEL_IMAGE_SUFFIXES:
        return UnarySource(str(source), read_label_image(source), True)
    return _load_array(source, str(source), stdin)


def convert_unary(
    source: UnarySource,
    image_hw: tuple[int, int],
    unary_type: str = "auto",
    *,
    label_confidence: float = DEFAULT_LABEL_CONFIDENCE,
    ignore_label: int | None = None,
    num_classes: int | None = None,
    layout: str = "auto",
    resize: str = "none",
) -> Unary:
    """Convert a loaded unary to logits ``[C,H,W] float32`` for an image of ``image_hw``
    (see :func:`read_unary`)."""
    if unary_type not in UNARY_TYPES:
        raise BadInputError(source.name, f"unknown unary type {unary_type!r}")
    if source.is_labels:
        unary = labels_to_unary(
            source.array,
            image_hw,
            source.name,
            label_confidence,
            ignore_label,
            num_classes,
            resize,
        )
        unused = {"--unary-type": unary_type != "auto", "--layout": layout != "auto"}
        applies_to = "an array unary (.npy, .npz)"
    else:
        # checked before inflating
        count_classes(source, image_hw, layout=layout, num_classes=num_classes, resize=resize)
        unary = array_to_unary(
            source.values(), image_hw, source.name, unary_type, layout, num_classes, resize
        )
        unused = {
            "--ignore-label": ignore_label is not None,
            "--label-confidence": label_confidence != DEFAULT_LABEL_CONFIDENCE,
        }
        applies_to = "a label-image unary"
    given = [option for option, is_given in unused.items() if is_given]
    if not given:
        return unary
    verb = "applies" if len(given) == 1 else "apply"
    warning = f"{source.name}: {' and '.join(given)} {verb} only to {applies_to}; ignored"
    return dataclasses.replace(unary, warnings=(*unary.warnings, warning))


def count_classes(
    source: UnarySource,
    image_hw: tuple[int, int],
    *,
    layout: str = "auto",
    ignore_label: int | None = None,
    num_classes: int | None = None,
    resize: str = "none",
) -> int:
    """The number of classes :func:`convert_unary` gives ``source``, without building logits.

    Checks what the count depends on (size, layout, resizing, labels, ``num_classes``) as
    :func:`convert_unary` does, so that a caller can check outputs and memory for the count
    before the ``[C,H,W]`` logits are allocated.
    """
    if source.is_labels:
        classes, _ = _label_classes(
            source.array, image_hw, source.name, ignore_label, num_classes, resize
        )
        return classes
    chw, _ = _chw(source.array, image_hw, source.name, layout, resize)
    return _array_classes(chw, source.name, num_classes)


def array_to_unary(
    array: np.ndarray,
    image_hw: tuple[int, int],
    name: str,
    unary_type: str = "auto",
    layout: str = "auto",
    num_classes: int | None = None,
    resize: str = "none",
) -> Unary:
    """Convert a float array ``[C,H,W]``/``[H,W,C]`` (optionally ``[1,...]``) to a :class:`Unary`
    for an image of ``image_hw``; with ``resize="bilinear"`` the array may have another size,
    and its logits are resized to ``image_hw`` (:func:`~convcrf_cli.resize.resize_logits`).

    ``name`` is the source's name for error messages.
    """
    chw, chosen = _chw(array, image_hw, name, layout, resize)
    _array_classes(chw, name, num_classes)
    values = _float32(chw, name)
    kind, reason = _kind(values, unary_type)
    warnings = ()
    if unary_type == "auto" and kind == "logit" and _looks_like_energy(values):
        warnings = (
            f"{name}: values are non-negative and exp(-value) sums to 1 over classes: they look "
            "like energies (-log p); read as logits, pass --unary-type energy if they are",
        )
    logits = _to_logits(values, kind, name)
    notes = ()
    if logits.shape[1:] != tuple(image_hw):
        notes = (_resize_note(name, logits.shape[1:], image_hw, "bilinear, on the logits"),)
        logits = resize_logits(logits, image_hw)
    return Unary(
        np.ascontiguousarray(logits, dtype=np.float32),
        chosen,
        kind,
        f"{chosen} {array.dtype} {reason}",
        warnings,
        notes,
    )


def labels_to_unary(
    labels: np.ndarray,
    image_hw: tuple[int, int],
    name: str,
    label_confidence: float = DEFAULT_LABEL_CONFIDENCE,
    ignore_label: int | None = None,
    num_classes: int | None = None,
    resize: str = "none",
) -> Unary:
    """Logits ``[C,H,W] float32`` from a label map ``[H,W]`` of class ids (see module doc); with
    ``resize="bilinear"`` a map ``[h,w]`` of another size, resized to ``image_hw`` by nearest
    neighbour (:func:`~convcrf_cli.resize.resize_labels`) after its classes are counted."""
    classes, valid = _label_classes(labels, image_hw, name, ignore_label, num_classes, resize)
    if not 1.0 / classes < label_confidence < 1.0:
        raise BadInputError(
            name,
            f"--label-confidence {label_confidence} must lie above 1/C = {1.0 / classes:.3g} "
            "(so that the label is the most likely class) and below 1",
        )
    notes = ()
    if labels.shape != tuple(image_hw):
        notes = (_resize_note(name, labels.shape, image_hw, "nearest neighbour, on the labels"),)
        labels = resize_labels(labels, image_hw)
        valid = resize_labels(valid, image_hw)
    other = np.float32(np.log((1.0 - label_confidence) / (classes - 1)))
    logits = np.full((classes, *labels.shape), other, dtype=np.float32)
    rows, cols = np.nonzero(valid)
    logits[labels[rows, cols], rows, cols] = np.log(label_confidence)
    logits[:, ~valid] = 0.0
    reason = f"label map, {classes} classes, confidence {label_confidence}" + (
        f", ignore label {ignore_label}: {int((~valid).sum())} pixels uniform"
        if ignore_label is not None
        else ""
    )
    return Unary(logits, "labels", "labels", reason, notes=notes)


def _resize_note(name: str, size: tuple[int, ...], image_hw: tuple[int, int], how: str) -> str:
    """The ``-v`` note on a unary resized from ``size`` to ``image_hw`` (``how``)."""
    return f"{name}: unary resized from {size[0]}×{size[1]} to {image_hw[0]}×{image_hw[1]} ({how})"


def _label_classes(
    labels: np.ndarray,
    image_hw: tuple[int, int],
    name: str,
    ignore_label: int | None,
    num_classes: int | None,
    resize: str = "none",
) -> tuple[int, np.ndarray]:
    """The class count of a label map ``[h,w]``, which must have the size ``image_hw`` unless
    ``resize`` resizes it (the count is that of the map as stored), and its mask of valid
    pixels ``[h,w] bool``."""
    _check_resize(resize, name)
    if resize == "none":
        check_label_size(name, labels, image_hw, hint=_RESIZE_HINT)
    valid = labels != ignore_label if ignore_label is not None else np.ones(labels.shape, bool)
    if not valid.any():
        raise BadInputError(name, "label map holds only the ignore label")
    largest = int(labels[valid].max())
    if labels[valid].min() < 0:
        raise BadInputError(name, "label map holds negative labels")
    classes = largest + 1 if num_classes is None else num_classes
    if num_classes is not None and num_classes < 2:
        raise BadInputError(name, f"--num-classes {num_classes}: a CRF needs at least 2 classes")
    if classes < 2:
        raise BadInputError(
            name, "label map holds only label 0: pass --num-classes (at least 2) to say how many"
        )
    if largest >= classes:
        raise BadInputError(
            name, f"label {largest} is outside the {classes} classes of --num-classes"
        )
    return classes, valid


def _chw(
    array: np.ndarray, image_hw: tuple[int, int], name: str, layout: str, resize: str = "none"
) -> tuple[np.ndarray, str]:
    """A ``[C,h,w]`` view of a float unary array and its layout (``"CHW"`` or ``"HWC"``);
    ``(h, w)`` is the image's ``image_hw`` unless ``resize`` resizes it."""
    _check_resize(resize, name)
    if not np.issubdtype(array.dtype, np.floating):
        raise BadInputError(
            name,
            f"unary must be float16, float32 or float64, got {array.dtype}"
            + (" (for class ids use a label image .png)" if array.dtype.kind in "iub" else ""),
        )
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise BadInputError(
            name,
            f"unary shape {array.shape} has {array.ndim} axes; expected [C,H,W] or [H,W,C] "
            f"for the {image_hw[0]}×{image_hw[1]} image",
        )
    chosen = _layout(array.shape, image_hw, name, layout, resize)
    chw = array if chosen == "CHW" else np.moveaxis(array, -1, 0)
    if chw.shape[0] == 0:
        raise BadInputError(name, f"unary shape {array.shape} has no classes (a class axis of 0)")
    return chw, chosen


def _array_classes(chw: np.ndarray, name: str, num_classes: int | None) -> int:
    """The class count of ``chw [C,H,W]`` (2 for one channel), checked against ``num_classes``."""
    channels = chw.shape[0]
    classes = 2 if channels == 1 else channels
    if num_classes is not None and num_classes != classes:
        raise BadInputError(
            name,
            (
                "unary has one channel, a foreground score read as 2 classes (background, "
                "foreground)"
                if channels == 1
                else f"unary has {classes} classes"
            )
            + f", but --num-classes is {num_classes}",
        )
    return classes


def _load_array(source: str | Path, name: str, stdin: BinaryIO | None) -> UnarySource:
    """The unary of a ``.npy``/``.npz`` file or of stdin's bytes (see :func:`_parse`)."""
    if str(source) == "-":
        data = (stdin or sys.stdin.buffer).read()
        if not data:
            raise BadInputError(name, "no data on stdin (expected .npy bytes)")
        is_npz = data.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC))
        if not is_npz and not data.startswith(_NPY_MAGIC):
            raise BadInputError(name, "not .npy data (no NumPy header)")
        return _parse(io.BytesIO(data), name, is_npz=is_npz)
    path = Path(source)
    suffix = path.suffix.lower()
    status = input_status(path)
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise BadInputError(name, "is a directory, not a unary file")
    if suffix not in (".npy", ".npz"):
        raise BadInputError(
            name,
            f"unknown unary format {suffix or '(no suffix)'}; use .npy, .npz or a label image "
            f"({', '.join(LABEL_IMAGE_SUFFIXES)})",
        )
    if status is None:
        raise BadInputError(name, "no such file")
    try:
        with open(path, "rb") as handle:
            return _parse(handle, name, is_npz=suffix == ".npz", path=path)
    except OSError as exc:  # opening it; errors of its contents are _parse's
        raise unreadable(name, exc) from exc


def _parse(handle: BinaryIO, name: str, is_npz: bool, path: Path | None = None) -> UnarySource:
    """The unary in ``handle``'s ``.npy``/``.npz`` bytes. A ``.npy`` file at ``path`` is
    memory-mapped (read-only) and an ``.npz`` member is inflated only by
    :meth:`UnarySource.values`: their shapes can be checked before their data are read."""
    kind = ".npz" if is_npz else ".npy"
    magic = _ZIP_MAGIC if is_npz else _NPY_MAGIC
    start = handle.read(len(magic))
    if is_npz and start == _EMPTY_ZIP_MAGIC:
        raise BadInputError(name, ".npz holds no arrays")
    if start != magic:
        problem = (
            "empty file" if not start else ("not a zip archive" if is_npz else "no NumPy header")
        )
        raise BadInputError(name, f"not a {kind} file ({problem})")
    handle.seek(0)
    with _reading(name, kind):
        if not is_npz:
            return UnarySource(name, _load_npy(handle, name, path), False)
        with np.load(handle, allow_pickle=False) as archive:
            key = _npz_key(list(archive.keys()), name)
            # NpzFile's lookup: the member named ``key``, else ``key`` + ".npy"
            member = key if key in archive.zip.namelist() else f"{key}.npy"
            with archive.zip.open(member) as stream:
                shape, dtype = _declared(stream, name, kind)
        stand_in = np.broadcast_to(np.zeros((), dtype), shape)
    return UnarySource(
        name, stand_in, False, functools.partial(_inflate, path or handle, key, name)
    )


@contextlib.contextmanager
def _reading(name: str, kind: str) -> Iterator[None]:
    """Turn the faults of reading ``kind`` (``".npy"``/``".npz"``) data into errors naming
    ``name``: :class:`BadInputError`, or a failure of the machine (see :func:`unreadable`)."""
    try:
        yield
    except BadInputError:
        raise
    except ValueError as exc:
        raise BadInputError(name, f"corrupt or truncated {kind} data ({exc})") from exc
    except OSError as exc:
        if exc.errno is not None:  # reading failed (too many open files, no memory, EIO)
            raise unreadable(name, exc) from exc
        raise BadInputError(name, f"corrupt or truncated {kind} data ({exc})") from exc
    except (tokenize.TokenError, SyntaxError) as exc:  # NumPy parses the header's literals
        raise BadInputError(name, f"corrupt {kind} header ({exc.args[0]})") from exc
    except (EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
        raise BadInputError(name, f"corrupt or truncated {kind} data ({exc})") from exc


def _npz_key(keys: list[str], name: str) -> str:
    """The ``.npz`` array to read: the only one, else the one named :data:`NPZ_KEY`."""
    if len(keys) == 1:
        return keys[0]
    if NPZ_KEY in keys:
        return NPZ_KEY
    raise BadInputError(
        name,
        f".npz holds {len(keys)} arrays ({', '.join(keys[:5])}"
        f"{', ...' if len(keys) > 5 else ''}); keep one, or name it '{NPZ_KEY}'",
    )


def _declared(handle: BinaryIO, name: str, kind: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the ``.npy`` header at ``handle``'s position, which is left at
    the array data. Arrays of Python objects are refused (they would need unpickling), and
    so are shapes no array can have (a negative length, more bytes than an address holds)."""
    version = np.lib.format.read_magic(handle)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    try:
        shape, _, dtype = read_header(handle)
    except ValueError as exc:
        if str(exc).startswith("EOF"):  # a truncated header: _reading says so
            raise
        raise BadInputError(name, f"corrupt {kind} header ({_header_problem(exc)})") from exc
    if dtype.hasobject:
        raise BadInputError(
            name, f"{kind} holds Python objects, which are not loaded; save a numeric array"
        )
    if any(length < 0 for length in shape):
        raise BadInputError(name, f"corrupt {kind} header (a negative length in its shape)")
    if math.prod(shape) * dtype.itemsize > np.iinfo(np.intp).max:
        raise BadInputError(
            name, f"corrupt {kind} header (its shape declares more bytes than an array can hold)"
        )
    return shape, dtype


def _header_problem(exc: ValueError) -> str:
    """NumPy's reason for refusing a ``.npy`` header in a few words: the start of its first
    line, before the header text or value it quotes (a header may hold 10,000 characters)."""
    return str(exc).splitlines()[0].split(": ")[0].rstrip(".")


def _load_npy(handle: BinaryIO, name: str, path: Path | None) -> np.ndarray:
    """A ``.npy`` array: memory-mapped from ``path`` where it has data, else read from
    ``handle`` (for stdin, bytes in memory that must hold the data the header declares)."""
    shape, dtype = _declared(handle, name, ".npy")
    declared = math.prod(shape) * dtype.itemsize
    data_start = handle.tell()
    held = handle.seek(0, io.SEEK_END) - data_start
    handle.seek(0)
    if path is not None and declared > 0:  # NumPy cannot map an empty array everywhere
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if declared > held:  # refused before NumPy allocates the declared size
        raise BadInputError(
            name,
            f"corrupt or truncated .npy data (the header declares {declared} bytes of array "
            f"data, {held} follow)",
        )
    return np.load(handle, allow_pickle=False)


def _inflate(source: Path | BinaryIO, key: str, name: str) -> np.ndarray:
    """The array ``key`` of the ``.npz`` file at ``source``, or in stdin's bytes ``source``."""
    if not isinstance(source, Path):
        source.seek(0)
    with _reading(name, ".npz"), np.load(source, allow_pickle=False) as archive:
        return archive[key]


def _readings(shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """The ``(h, w)`` of a three-axis ``shape`` read as CHW and as HWC."""
    return {"CHW": shape[1:], "HWC": shape[:2]}


def _check_resize(resize: str, name: str) -> None:
    """Refuse a ``resize`` mode that is not one of :data:`RESIZE_MODES` (a caller's mistake,
    reported for the unary ``name`` as an unknown layout is)."""
    if resize not in RESIZE_MODES:
        raise BadInputError(name, f"unknown resize {resize!r}")


def _layout(
    shape: tuple[int, ...], image_hw: tuple[int, int], name: str, requested: str, resize: str
) -> str:
    """``"CHW"`` or ``"HWC"``: ``requested``, else the reading of ``shape`` with the image's
    ``(H, W)``, else (resizing) the one with its aspect ratio (:func:`_layout_by_aspect`)."""
    if requested not in LAYOUTS:
        raise BadInputError(name, f"unknown layout {requested!r}")
    height, width = image_hw
    size = f"{height}×{width} image"
    readings = _readings(shape)
    exact = [layout for layout, reading in readings.items() if reading == (height, width)]
    if requested != "auto":
        if requested not in exact and resize == "none":
            expected = (
                f"(C, {height}, {width})" if requested == "CHW" else f"({height}, {width}, C)"
            )
            raise BadInputError(
                name, f"unary shape {shape} is not {requested} {expected} for the {size}"
            )
        if 0 in readings[requested]:
            raise BadInputError(name, f"unary shape {shape} has no pixels to resize as {requested}")
        return requested
    if len(exact) == 2:
        raise BadInputError(
            name,
            f"unary shape {shape} fits the {size} both as CHW (C={shape[0]}) and as HWC "
            f"(C={shape[2]}); name the layout (--layout CHW or --layout HWC)",
        )
    if exact:
        return exact[0]
    if resize != "none":
        return _layout_by_aspect(shape, image_hw, name)
    hint = f"; {_RESIZE_HINT}"
    if shape[0] == height and shape[2] == width:
        hint = "; the class axis is in the middle: it must be first (CHW) or last (HWC)"
    elif sorted(shape[:2]) == sorted(image_hw) or sorted(shape[1:]) == sorted(image_hw):
        hint = "; height and width are swapped (a transposed or rotated unary?)"
    raise BadInputError(
        name,
        f"unary shape {shape} does not fit the {size}: expected (C, {height}, {width}) "
        f"or ({height}, {width}, C){hint}",
    )


def _layout_by_aspect(shape: tuple[int, ...], image_hw: tuple[int, int], name: str) -> str:
    """The one reading of ``shape`` whose ``(h, w)`` has the aspect ratio of ``image_hw``
    (:func:`~convcrf_cli.resize.aspect_matches`); an error naming the layout option when both
    or neither have it."""
    readings = _readings(shape)
    matching = [layout for layout, size in readings.items() if aspect_matches(size, image_hw)]
    if len(matching) == 1:
        return matching[0]
    sizes = ", ".join(f"{layout} {h}×{w}" for layout, (h, w) in readings.items())
    which = "both readings have" if matching else "neither reading has"
    raise BadInputError(
        name,
        f"unary shape {shape} differs from the {image_hw[0]}×{image_hw[1]} image and {which} "
        f"its aspect ratio ({sizes}): name the layout (--layout CHW or --layout HWC) to "
        "resize it",
    )


def _float32(chw: np.ndarray, name: str) -> np.ndarray:
    """A float32 copy of ``chw [C,H,W]``; NaN, infinities and values beyond the float32 range
    (which the cast would make infinite) are refused."""
    with np.errstate(over="ignore"):
        values = chw.astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        non_finite = ~np.isfinite(chw)
        if non_finite.any():
            bad, what = non_finite, "NaN or infinite values"
        else:
            what = f"values beyond the float32 range (±{np.finfo(np.float32).max:.4g})"
        c, y, x = (int(i) for i in np.argwhere(bad)[0])
        raise BadInputError(
            name,
            f"unary holds {int(bad.sum())} {what} "
            f"(first {chw[c, y, x]:.4g} at class {c}, row {y}, column {x})",
        )
    return values


def _kind(chw: np.ndarray, unary_type: str) -> tuple[str, str]:
    """The unary type to use and the reason, for ``-v``."""
    if unary_type != "auto":
        return unary_type, f"read as {unary_type} (--unary-type {unary_type})"
    low, high = float(chw.min()), float(chw.max())
    in_unit = low >= 0.0 and high <= 1.0
    if chw.shape[0] == 1:
        if in_unit:
            return "prob", "one channel with values in [0, 1]: read as a probability (auto)"
        return "logit", "one channel with values outside [0, 1]: read as a logit (auto)"
    if in_unit:
        worst = float(np.abs(chw.sum(axis=0, dtype=np.float64) - 1.0).max())
        if worst <= AUTO_TOLERANCE:
            return (
                "prob",
                "values in [0, 1] summing to 1 over classes: read as probabilities (auto)",
            )
        return "logit", (
            f"values in [0, 1] but sums over classes are off 1 by up to {worst:.3g}: "
            "read as logits (auto)"
        )
    return "logit", f"values in [{low:.3g}, {high:.3g}]: read as logits (auto)"


def _looks_like_energy(chw: np.ndarray) -> bool:
    if chw.shape[0] < 2 or float(chw.min()) < 0.0:
        return False
    sums = np.exp(-chw.astype(np.float64)).sum(axis=0)
    return bool(np.abs(sums - 1.0).max() <= AUTO_TOLERANCE)


def _to_logits(values: np.ndarray, kind: str, name: str) -> np.ndarray:
    """Logits from ``values [C,H,W] float32``, a copy this function may change in place."""
    if kind == "prob":
        low, high = float(values.min()), float(values.max())
        if low < 0.0:
            c, y, x = (int(i) for i in np.argwhere(values == low)[0])
            raise BadInputError(
                name,
                f"negative probability {low:.4g} at class {c}, row {y}, column {x} "
                "(pass --unary-type logit if these are scores)",
            )
        if high > 1.0 + AUTO_TOLERANCE:
            raise BadInputError(
                name,
                f"probability {high:.4g} above 1 (pass --unary-type logit if these are scores)",
            )
        if values.shape[0] == 1:
            values = np.concatenate([1.0 - values, values])
        np.maximum(values, PROB_EPS, out=values)
        return np.log(values, out=values)
    if kind == "energy":
        if values.shape[0] == 1:
            raise BadInputError(name, "energies need one channel per class; got a single channel")
        return -values
    if values.shape[0] == 1:
        return np.concatenate([np.zeros_like(values), values])
    return values
