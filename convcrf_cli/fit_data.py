"""Training data on disk for :func:`convcrf_cli.fit.fit`: image, unary and label files paired
by name, read into checked :class:`~convcrf_cli.fit.Example` objects, and the starting point
read from a parameter file (C/T matrices included). Every fault is a
:class:`~convcrf_cli.errors.BadInputError` naming the file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from convcrf_cli.batch_items import IMAGE_GLOBS, UNARY_GLOBS, find_files
from convcrf_cli.core import InputError
from convcrf_cli.errors import BadInputError
from convcrf_cli.fit import Example, check_start_module, label_range_problem
from convcrf_cli.imageio import LoadedImage, check_label_size, load_image, read_label_image
from convcrf_cli.outputs import real_path
from convcrf_cli.params import (
    CRFParams,
    ParamsError,
    params_file_name,
    read_params_json,
    split_transforms,
)
from convcrf_cli.pipeline import (
    UnaryOptions,
    check_orientation,
    check_pooled_range,
    convert_with,
    orientation_mismatch,
    orientation_warning,
)
from convcrf_cli.torch import ConvCRF
from convcrf_cli.unary import (
    LABEL_IMAGE_SUFFIXES,
    Unary,
    UnarySource,
    load_unary,
)

LABEL_GLOBS = tuple(f"*{suffix}" for suffix in LABEL_IMAGE_SUFFIXES)
"""Label maps of class ids that pairing looks for (the label images a unary may be)."""


class TrainingFiles(NamedTuple):
    """The files of one training image, paired by ``key`` (relative path without suffix)."""

    key: str
    image: Path
    unary: Path
    labels: Path


class TrainingPairs(NamedTuple):
    """What :func:`pair_training_files` found.

    files: one entry per image, sorted by key. unused: by kind (``"unary"``, ``"label map"``),
    the sorted paths of files that no image names.
    """

    files: list[TrainingFiles]
    unused: dict[str, list[str]]


LoadedCallback = Callable[[TrainingFiles, Unary, tuple[str, ...]], None]
"""Called by :func:`load_examples` when an image and its unary have been read (before they
are checked), with the files, the unary and the warnings on the two (the unary's, and one on
an EXIF orientation the sizes cannot confirm) that the caller reports."""


def pair_training_files(images: Path, unaries: Path, labels: Path) -> TrainingPairs:
    """Pair the files of three directory trees by relative path and stem (suffixes matched
    ignoring case). Unaries are arrays and label images, but only arrays in a directory shared
    with the images or the label maps (:func:`_shared_role`); where a stem has both, the array
    is the unary (a label image beside it is taken for a preview). An image without a unary or
    a label map is an error; unaries and label maps without an image are returned as unused."""
    shared = _shared_role(images, unaries, labels)
    globs = UNARY_GLOBS if shared else UNARY_GLOBS + LABEL_GLOBS
    image_files = find_files(images, IMAGE_GLOBS)
    unary_files = find_files(unaries, UNARY_GLOBS)
    if not shared:
        unary_files = {**find_files(unaries, LABEL_GLOBS), **unary_files}
    label_files = find_files(labels, LABEL_GLOBS)
    if not image_files:
        raise BadInputError(images, f"no images ({', '.join(IMAGE_GLOBS)})")
    arrays_only = (
        f"; it is also the {shared} directory, so only its .npy and .npz files are unaries"
    )
    for key, path in sorted(image_files.items()):
        for files, directory, kind, kind_globs, note in (
            (unary_files, unaries, "unary", globs, arrays_only if shared else ""),
            (label_files, labels, "label map", LABEL_GLOBS, ""),
        ):
            if key not in files:
                names = ", ".join(glob.replace("*", key, 1) for glob in kind_globs)
                raise BadInputError(path, f"no {kind} in {directory} ({names}){note}")
    unused = {
        kind: sorted(str(files[key]) for key in files.keys() - image_files.keys())
        for files, kind in ((unary_files, "unary"), (label_files, "label map"))
    }
    paired = [
        TrainingFiles(key, image_files[key], unary_files[key], label_files[key])
        for key in sorted(image_files)
    ]
    return TrainingPairs(paired, unused)


def _shared_role(images: Path, unaries: Path, labels: Path) -> str:
    """``"labels"`` or ``"images"`` where ``unaries`` is also that directory (its label images
    and images are those, not unaries), else ``""``."""
    where = real_path(unaries)
    for role, directory in (("labels", labels), ("images", images)):
        if real_path(directory) == where:
            return role
    return ""


def load_examples(
    files: list[TrainingFiles],
    options: UnaryOptions,
    on_loaded: LoadedCallback | None = None,
    *,
    blur: int,
) -> list[Example]:
    """Read the files of :func:`pair_training_files` into examples (image ``[H,W,F]`` uint8,
    uint16 or float32, logits ``[C,H,W] float32``, labels ``[H,W] int64``).

    ``options`` say how to read the unaries and images, as ``convcrf refine`` reads them (a
    unary of another size resized to its image's with ``options.resize``); its
    ``ignore_label`` (an int here) is the label value that is no class: label maps' pixels
    with it are left out, label-image unaries' pixels with it get a uniform distribution.
    Images are used in their EXIF orientation (as stored with ``apply_exif`` False); a unary
    that fits only the other orientation is an error saying so. Every image must have the
    first one's classes and channels, and its label map the image's size and values in
    ``[0, C)`` or the ignore label (label maps are never resized). A floating-point image
    whose values summed over a cell of ``blur`` (the CRF's, at any crop's offset) overflow
    float32 is refused (:func:`~convcrf_cli.pipeline.check_pooled_range`)."""
    examples: list[Example] = []
    first_hint = ""
    for entry in files:
        loaded = load_image(entry.image, apply_exif=options.apply_exif)
        image = loaded.pixels
        check_pooled_range(entry.image, image, blur, any_offset=True)
        source = load_unary(entry.unary)
        check_orientation(loaded, source, entry.image, options)
        unary = _convert(source, image.shape[:2], options)
        if on_loaded is not None:
            warning = orientation_warning(loaded, source, entry.image, options)
            on_loaded(entry, unary, unary.warnings + ((warning,) if warning else ()))
        hint = _classes_hint(unary, options)
        if examples:
            _check_like_first(entry, image, unary, files[0], examples[0], hint or first_hint)
        else:
            first_hint = hint
        label_map = read_label_image(entry.labels)
        check_label_orientation(entry.labels, label_map, loaded, entry.image)
        check_label_map(
            entry.labels,
            label_map,
            image.shape[:2],
            unary.num_classes,
            options.ignore_label,
            hint,
        )
        examples.append(Example(entry.key, image, unary.logits, label_map))
    return examples


def _convert(source: UnarySource, image_hw: tuple[int, int], options: UnaryOptions) -> Unary:
    """``source`` as logits ``[C,H,W] float32`` for an image of ``image_hw``, read with
    ``options``; their ignore label goes to a label image only (an array has no use for it,
    and :func:`~convcrf_cli.unary.convert_unary` would warn that it is ignored)."""
    if not source.is_labels:
        options = dataclasses.replace(options, ignore_label=None)
    return convert_with(source, image_hw, options)


def _classes_hint(unary: Unary, options: UnaryOptions) -> str:
    """What to add to an error on ``unary``'s class count: for a label image whose count
    is its largest label + 1, how to give the count."""
    if unary.kind != "labels" or options.num_classes is not None:
        return ""
    return "; a label-image unary has its largest label + 1 classes: pass --num-classes"


def check_label_orientation(
    path: Path, labels: np.ndarray, image: LoadedImage, image_path: Path
) -> None:
    """Raise BadInputError naming ``path`` when ``labels`` ``[H,W]`` fit only the other EXIF
    orientation of ``image`` (read from ``image_path``), saying so as
    :func:`~convcrf_cli.pipeline.check_orientation` does for the unary."""
    mismatch = orientation_mismatch(image, lambda hw: labels.shape == hw, image_path)
    if mismatch:
        raise BadInputError(
            path,
            f"label map {mismatch}; label maps are used as stored, so it must be turned to "
            "match the unary",
        )


def check_label_map(
    path: Path,
    labels: np.ndarray,
    image_hw: tuple[int, int],
    num_classes: int,
    ignore: int,
    hint: str = "",
) -> None:
    """Raise BadInputError naming ``path`` unless ``labels`` ``[H,W]`` (integers) have the
    size ``image_hw`` and values in ``[0, num_classes)`` or equal to ``ignore``; ``hint`` is
    added to an error on the values."""
    check_label_size(path, labels, image_hw)
    problem = label_range_problem(labels, num_classes, ignore)
    if problem:
        raise BadInputError(path, problem + hint)


def read_start(path: Path) -> tuple[CRFParams, dict]:
    """The parameters of a parameter file and its C/T matrices (JSON lists of rows, by key of
    :data:`~convcrf_cli.params.TRANSFORM_KEYS`; checked by :func:`start_module`)."""

    def split(data: object) -> tuple[CRFParams, dict]:
        fields, transforms = split_transforms(data)
        return CRFParams.from_dict(fields), transforms

    return read_params_json(path, split)


def start_module(
    path: Path,
    params: CRFParams,
    transforms: dict,
    examples: list[Example],
    learn: tuple[str, ...],
) -> ConvCRF:
    """The starting module: ``params`` with the C/T matrices read from the file ``path``
    (``-``: stdin), which must fit the examples' classes and image channels."""
    num_classes, num_features = examples[0].logits.shape[0], examples[0].image.shape[2]
    try:
        saved = ConvCRF.from_dict(
            {**params.to_dict(), **transforms}, num_classes, learn, num_features=num_features
        )
        check_start_module(saved, num_classes, num_features)
        return saved
    except (ParamsError, InputError) as exc:
        raise BadInputError(params_file_name(path), str(exc)) from exc


def _check_like_first(
    entry: TrainingFiles,
    image: np.ndarray,
    unary: Unary,
    first: TrainingFiles,
    example: Example,
    hint: str = "",
) -> None:
    """Refuse an image whose classes or channels differ from the first example's (``hint``
    added to an error on the classes)."""
    classes = example.logits.shape[0]
    if unary.num_classes != classes:
        raise BadInputError(
            entry.unary,
            f"unary has {unary.num_classes} classes, {first.unary} has {classes}{hint}",
        )
    channels = example.image.shape[2]
    if image.shape[2] != channels:
        raise BadInputError(
            entry.image,
            f"image has {image.shape[2]} channel(s), {first.image} has {channels}",
        )
