"""Batch inputs: pair images with unaries (by relative path and stem, a manifest, or a list),
shard the items, and plan output paths with collision checks. No decoding, no computing."""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from convcrf_cli.errors import BadInputError, ConvCRFError, input_status, unreadable
from convcrf_cli.outputs import LABEL_OUTPUT_SUFFIXES, real_path
from convcrf_cli.params import parse_json

IMAGE_GLOBS = ("*.jpg", "*.jpeg", "*.png", "*.tif", "*.tiff", "*.webp", "*.bmp")
UNARY_GLOBS = ("*.npy", "*.npz")


@dataclass(frozen=True)
class Pair:
    """One image with its unary; ``key`` is the relative path without suffix (``city/a``)."""

    key: str
    image: Path
    unary: Path
    output: Path | None = None  # manifest's output, relative to the output directory


@dataclass(frozen=True)
class BatchItem:
    """A pair with every output path decided."""

    key: str
    image: Path
    unary: Path
    output: Path
    overlay: Path | None
    probs: Path | None

    def outputs(self) -> list[Path]:
        """The output paths: label map, then overlay and probabilities where given."""
        return [p for p in (self.output, self.overlay, self.probs) if p is not None]


@dataclass(frozen=True)
class Pairing:
    """The pairs, the files left without a partner, and (from a list) the listed images that
    do not exist; ``keys`` holds the key each unpaired or missing file would have as an item
    (what :func:`select_unpaired_shard` shards them by)."""

    pairs: list[Pair]
    unpaired_images: list[Path]
    unpaired_unaries: list[Path]
    missing_images: list[Path] = field(default_factory=list)
    keys: dict[Path, str] = field(default_factory=dict)


def split_globs(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """``"*.jpg,*.png"`` -> ``("*.jpg", "*.png")``; None or empty gives ``default``."""
    globs = tuple(g.strip() for g in (text or "").split(",") if g.strip())
    return globs or default


def find_files(root: Path, globs: tuple[str, ...], skip: Iterable[Path] = ()) -> dict[str, Path]:
    """Files under ``root`` (recursive) whose name matches a glob, ignoring case (``*.png``
    matches ``A.PNG``), keyed by relative path without suffix.

    Symlinked directories are followed (each real directory searched once, so a loop ends);
    a symlink whose target is missing counts as a file, so that reading it fails by name
    instead of dropping it. Directories in ``skip`` (output directories inside ``root``) are
    not searched. Two files with one key (``a.jpg`` and ``a.png``) are an error, and so is a
    directory that cannot be listed (its files are not dropped without a word), or that cannot
    be looked at (:func:`~convcrf_cli.errors.input_status`: a name too long, a symlink loop).
    """
    status = input_status(root)
    if status is None:
        raise BadInputError(root, "no such directory")
    if not stat.S_ISDIR(status.st_mode):
        raise BadInputError(root, "not a directory")
    patterns = [glob.lower() for glob in globs]
    skipped = {real_path(directory) for directory in skip}
    searched: set[Path] = set()
    found: dict[str, Path] = {}

    def unlisted(exc: OSError) -> None:  # a directory that cannot be listed is not skipped
        raise BadInputError(exc.filename or root, f"cannot list directory: {exc.strerror or exc}")

    for directory, subdirectories, names in os.walk(root, onerror=unlisted, followlinks=True):
        real = real_path(directory)
        if real in searched or real in skipped:
            subdirectories.clear()
            continue
        searched.add(real)
        subdirectories.sort()
        for name in sorted(names):
            if not any(fnmatch.fnmatchcase(name.lower(), p) for p in patterns):
                continue
            path = Path(directory) / name
            key = path.relative_to(root).with_suffix("").as_posix()
            if key in found:
                raise BadInputError(path, f"same name as {found[key]} (pairing is by name)")
            found[key] = path
    return found


def pair_directories(
    images_dir: Path,
    unaries_dir: Path,
    image_globs: tuple[str, ...] = IMAGE_GLOBS,
    unary_globs: tuple[str, ...] = UNARY_GLOBS,
    outputs: Iterable[tuple[Path, str]] = (),
) -> Pairing:
    """Pair ``images_dir/REL.ext`` with ``unaries_dir/REL.npy`` (same relative path and stem).

    ``outputs``: (directory, suffix) of what the batch writes, so that the outputs of an
    earlier run are not read as inputs (see :func:`output_dirs_to_skip`).
    """
    outputs = list(outputs)
    images = find_files(
        images_dir, image_globs, output_dirs_to_skip(outputs, images_dir, image_globs, "images")
    )
    unaries = find_files(
        unaries_dir, unary_globs, output_dirs_to_skip(outputs, unaries_dir, unary_globs, "unaries")
    )
    pairs = [Pair(key, images[key], unaries[key]) for key in sorted(images.keys() & unaries.keys())]
    image_keys = sorted(images.keys() - unaries.keys())
    unary_keys = sorted(unaries.keys() - images.keys())
    return Pairing(
        pairs,
        [images[key] for key in image_keys],
        [unaries[key] for key in unary_keys],
        keys={images[key]: key for key in image_keys} | {unaries[key]: key for key in unary_keys},
    )


def output_dirs_to_skip(
    outputs: list[tuple[Path, str]], root: Path, globs: tuple[str, ...], role: str
) -> list[Path]:
    """The output directories below the input directory ``root`` (of the ``role`` images or
    unaries) whose files, of the given suffix, match ``globs``: the search for inputs leaves
    them out. One that is ``root`` itself is a :class:`BadInputError`: its outputs would be
    read as inputs by the next run."""
    real_root = real_path(root)
    skipped = []
    for directory, suffix in outputs:
        if not any(_may_end_in(glob, suffix) for glob in globs):
            continue
        real = real_path(directory)
        if real == real_root:
            raise BadInputError(
                directory,
                f"is the {role} directory too: {suffix} outputs there would be read as {role} "
                "by the next run; write them to another directory",
            )
        if real_root in real.parents:
            skipped.append(directory)
    return skipped


def _may_end_in(glob: str, suffix: str) -> bool:
    """Whether ``glob`` can match a file named ``STEM + suffix`` (ignoring case): its ending
    after the last dot is ``suffix``, or that ending has wildcards, or it has no dot."""
    _, dot, ending = glob.lower().rpartition(".")
    if not dot or any(wildcard in ending for wildcard in "*?["):
        return True
    return f".{ending}" == suffix.lower()


def pair_image_list(
    lines: list[str],
    unaries_dir: Path,
    unary_globs: tuple[str, ...] = UNARY_GLOBS,
    outputs: Iterable[tuple[Path, str]] = (),
) -> Pairing:
    """Pair each listed image path with the unary of the same stem in ``unaries_dir``.

    Keys are the image stems; list images from one directory tree per run, or use a manifest.
    Only the listed images count: a listed image that does not exist is missing, one without
    a unary unpaired; unaries that no listed image names are not reported. A listed image
    whose stem two unaries have (``un/x/a.npy``, ``un/y/a.npy``) is a :class:`BadInputError`.
    """
    skipped = output_dirs_to_skip(list(outputs), unaries_dir, unary_globs, "unaries")
    unaries: dict[str, list[Path]] = {}
    for path in find_files(unaries_dir, unary_globs, skipped).values():
        unaries.setdefault(path.stem, []).append(path)
    pairs, unpaired, missing = [], [], []
    for line in lines:
        image = Path(line)
        found = unaries.get(image.stem, [])
        if _missing(image):
            missing.append(image)
        elif not found:
            unpaired.append(image)
        elif len(found) > 1:
            raise BadInputError(
                image,
                f"{len(found)} unaries have its stem ({', '.join(map(str, found))}); "
                "--from-list pairs by stem: keep one, or use a manifest",
            )
        else:
            pairs.append(Pair(image.stem, image, found[0]))
    return Pairing(pairs, unpaired, [], missing, {path: path.stem for path in unpaired + missing})


def read_lines(source: str) -> list[str]:
    """The lines of a UTF-8 file or of stdin (``-``), stripped of surrounding white space,
    without blank lines and comments (``#`` after any indentation)."""
    lines = (line.strip() for line in _read_text(source).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_manifest(source: str) -> list[Pair]:
    """Read a CSV (header ``image,unary[,output]``) or JSON Lines manifest (``-`` = stdin),
    UTF-8 with or without a byte-order mark.

    Relative image and unary paths are taken relative to the manifest's directory (the working
    directory for stdin); ``output`` is relative to the batch output directory and names a
    ``.png`` or ``.npy`` label file. Keys are the output paths without suffix, else the image
    paths without suffix (just the stem for an absolute image path or one with ``..``).
    """
    text = _read_text(source)
    name = _source_name(source)
    base = Path(".") if source == "-" else Path(source).parent
    rows = _jsonl_rows(name, text) if _is_json(source, text) else _csv_rows(name, text)
    if not rows:
        raise BadInputError(name, "the manifest lists no items")
    pairs = []
    for number, row in rows:
        image, unary, output = (_field(name, number, row, k) for k in ("image", "unary", "output"))
        missing = [k for k, value in (("image", image), ("unary", unary)) if value is None]
        if missing:
            raise BadInputError(name, f"line {number}: missing {' and '.join(missing)}")
        output_path = None if output is None else Path(output)
        if output_path is not None:
            _check_manifest_output(name, number, output_path)
        image_path = Path(image)
        key = output_path or (image_path if _inside(image_path) else Path(image_path.name))
        pairs.append(
            Pair(key.with_suffix("").as_posix(), base / image_path, base / unary, output_path)
        )
    return pairs


def _field(name: str, number: int, row: dict, column: str) -> str | None:
    """The path in ``row[column]``; None when absent or empty. Anything but text is an error."""
    value = row.get(column)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadInputError(
            name, f"line {number}: {column} must be a path (a string), got {json.dumps(value)}"
        )
    return value


def _check_manifest_output(name: str, number: int, output: Path) -> None:
    if not _inside(output):
        raise BadInputError(
            name, f"line {number}: output {output} must be a relative path without '..'"
        )
    if output.suffix.lower() not in LABEL_OUTPUT_SUFFIXES:
        raise BadInputError(
            name, f"line {number}: output {output} must end in {' or '.join(LABEL_OUTPUT_SUFFIXES)}"
        )


def _inside(path: Path) -> bool:
    """Whether ``path`` stays inside the directory it is relative to."""
    return not path.is_absolute() and ".." not in path.parts


def _source_name(source: str) -> str:
    return "stdin" if source == "-" else source


def _read_text(source: str) -> str:
    """The text of the file ``source`` or of stdin (``-``): UTF-8, a leading byte-order mark
    (as Excel and PowerShell write) dropped."""
    name = _source_name(source)
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise unreadable(name, exc) from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadInputError(
            name, f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8"
        ) from exc


def _is_json(source: str, text: str) -> bool:
    """Whether a manifest is JSON (Lines): by its suffix, else (stdin, other suffixes) by its
    first character."""
    suffix = Path(source).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return True
    return suffix != ".csv" and text.lstrip()[:1] in ("{", "[")


def _csv_rows(name: str, text: str) -> list[tuple[int, dict]]:
    """(line number, row) of each CSV record after the header; spaces after a comma
    (``image, unary``, as people type CSV) are not part of the next field."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    if not reader.fieldnames or not {"image", "unary"} <= set(reader.fieldnames):
        raise BadInputError(name, "CSV manifest needs a header with columns image,unary[,output]")
    return [(reader.line_num, row) for row in reader]


def _jsonl_rows(name: str, text: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty JSON Lines line."""
    if text.lstrip().startswith("["):
        raise BadInputError(
            name, "a JSON array; a manifest holds one JSON object per line (JSON Lines)"
        )
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(name, f"line {i + 1}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise BadInputError(name, f"line {i + 1}: expected a JSON object")
        rows.append((i + 1, row))
    return rows


def _missing(path: Path) -> bool:
    """Whether nothing is at ``path``. A path that cannot be looked at (a directory on the way
    that may not be searched, a name too long) is not missing: reading it says why."""
    try:
        return input_status(path) is None
    except ConvCRFError:
        return False


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; :class:`ValueError` saying what is wrong else."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{text}: need 0 <= I < N")
    return index, count


def shard_of(key: str, count: int) -> int:
    """Stable shard of an item: a hash of its key, the same on every machine and run."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


Keyed = TypeVar("Keyed", Pair, BatchItem)


def select_unpaired_shard(pairing: Pairing, index: int, count: int) -> Pairing:
    """``pairing`` with only the unpaired and missing files of shard ``index`` of ``count``
    (by their keys, as items are), so that each is reported by one shard; the pairs stay whole
    (the planned items are split by :func:`select_shard`)."""

    def mine(paths: list[Path]) -> list[Path]:
        return [path for path in paths if shard_of(pairing.keys[path], count) == index]

    return replace(
        pairing,
        unpaired_images=mine(pairing.unpaired_images),
        unpaired_unaries=mine(pairing.unpaired_unaries),
        missing_images=mine(pairing.missing_images),
    )


def select_shard(items: list[Keyed], index: int, count: int) -> list[Keyed]:
    """The pairs or planned items of shard ``index`` of ``count`` (by :func:`shard_of`)."""
    return [item for item in items if shard_of(item.key, count) == index]


def plan_outputs(
    pairs: list[Pair],
    out_dir: Path,
    out_suffix: str = ".png",
    overlay_dir: Path | None = None,
    probs_dir: Path | None = None,
    *,
    report: Path | None = None,
    inputs: Iterable[Path] = (),
) -> list[BatchItem]:
    """Decide every output path (relative paths kept) and reject collisions before any work:
    two inputs writing one file, two outputs of one input writing one file, or an output that
    would overwrite an input.

    report: the report file, checked like the outputs (None: no report file).
    inputs: input files besides the pairs' images and unaries (unpaired files, the manifest),
    which no output may overwrite either.
    """
    paired = [path for pair in pairs for path in (pair.image, pair.unary)]
    claims = _Claims([*paired, *inputs])
    items = []
    for pair in pairs:
        item = BatchItem(
            pair.key,
            pair.image,
            pair.unary,
            out_dir / (pair.output or f"{pair.key}{out_suffix}"),
            overlay_dir / f"{pair.key}.png" if overlay_dir else None,
            probs_dir / f"{pair.key}.npy" if probs_dir else None,
        )
        claims.claim(item.output, f"the label output of {pair.image}", pair.image)
        if item.overlay is not None:
            claims.claim(item.overlay, f"the overlay of {pair.image}", pair.image)
        if item.probs is not None:
            claims.claim(item.probs, f"the probabilities of {pair.image}", pair.image)
        items.append(item)
    if report is not None:
        claims.claim(report, "the report", None)
    return items


class _Claims:
    """Output paths claimed so far and by which output; the inputs no output may overwrite."""

    def __init__(self, inputs: Iterable[Path]) -> None:
        self.inputs = {real_path(path) for path in inputs}
        self.owners: dict[Path, tuple[str, Path | None]] = {}

    def claim(self, path: Path, role: str, image: Path | None) -> None:
        """Claim ``path`` for the output described by ``role`` (of input ``image``)."""
        resolved = real_path(path)
        if resolved in self.inputs:
            raise BadInputError(path, "output would overwrite an input file")
        if resolved in self.owners:
            other_role, other_image = self.owners[resolved]
            if image is not None and (image, role) == (other_image, other_role):
                raise BadInputError(image, f"given twice: both items would write {path}")
            if None not in (image, other_image) and image != other_image:
                raise BadInputError(path, f"two inputs write here: {other_image} and {image}")
            raise BadInputError(path, f"{other_role} and {role} would both be written here")
        self.owners[resolved] = (role, image)
