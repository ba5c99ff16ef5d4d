"""Batch inputs: pair images with unaries (by relative path and stem, a manifest, or a list),
shard the items, and plan output paths with collision checks. No decoding, no computing."""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from convcrf_cli.errors import BadInputError

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
        return [p for p in (self.output, self.overlay, self.probs) if p is not None]


@dataclass(frozen=True)
class Pairing:
    pairs: list[Pair]
    unpaired_images: list[Path]
    unpaired_unaries: list[Path]


def split_globs(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """``"*.jpg,*.png"`` -> ``("*.jpg", "*.png")``; None or empty gives ``default``."""
    globs = tuple(g.strip() for g in (text or "").split(",") if g.strip())
    return globs or default


def find_files(root: Path, globs: tuple[str, ...]) -> dict[str, Path]:
    """Files under ``root`` (recursive) whose name matches a glob, keyed by relative path
    without suffix. Two files with one key (``a.jpg`` and ``a.png``) are an error."""
    if not root.is_dir():
        raise BadInputError(root, "not a directory")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not any(fnmatch.fnmatch(path.name, g) for g in globs):
            continue
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
) -> Pairing:
    """Pair ``images_dir/REL.ext`` with ``unaries_dir/REL.npy`` (same relative path and stem)."""
    images = find_files(images_dir, image_globs)
    unaries = find_files(unaries_dir, unary_globs)
    pairs = [Pair(key, images[key], unaries[key]) for key in sorted(images.keys() & unaries.keys())]
    return Pairing(
        pairs,
        [images[k] for k in sorted(images.keys() - unaries.keys())],
        [unaries[k] for k in sorted(unaries.keys() - images.keys())],
    )


def pair_image_list(
    lines: list[str], unaries_dir: Path, unary_globs: tuple[str, ...] = UNARY_GLOBS
) -> Pairing:
    """Pair each listed image path with the unary of the same stem in ``unaries_dir``.

    Keys are the image stems; list images from one directory tree per run, or use a manifest.
    """
    unaries = {path.stem: path for path in find_files(unaries_dir, unary_globs).values()}
    pairs, unpaired = [], []
    for line in lines:
        image = Path(line)
        unary = unaries.get(image.stem)
        if unary is None:
            unpaired.append(image)
        else:
            pairs.append(Pair(image.stem, image, unary))
    used = {p.unary for p in pairs}
    return Pairing(pairs, unpaired, sorted(set(unaries.values()) - used))


def read_lines(source: str) -> list[str]:
    """Non-empty, non-comment lines of a file or of stdin (``-``)."""
    text = sys.stdin.read() if source == "-" else _read_text(Path(source))
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def read_manifest(source: str) -> list[Pair]:
    """Read a CSV (header ``image,unary[,output]``) or JSON Lines manifest (``-`` = stdin).

    Relative image and unary paths are taken relative to the manifest's directory (the working
    directory for stdin); ``output`` is relative to the batch output directory. Keys are the
    output paths without suffix, else the image paths without suffix (just the stem for an
    absolute image path or one with ``..``).
    """
    text = sys.stdin.read() if source == "-" else _read_text(Path(source))
    base = Path(".") if source == "-" else Path(source).parent
    is_jsonl = text.lstrip().startswith("{")
    rows = _jsonl_rows(source, text) if is_jsonl else _csv_rows(source, text)
    pairs = []
    for number, row in rows:
        missing = [k for k in ("image", "unary") if not row.get(k)]
        if missing:
            raise BadInputError(source, f"entry {number}: missing {' and '.join(missing)}")
        output = Path(row["output"]) if row.get("output") else None
        if output is not None and not _inside(output):
            raise BadInputError(
                source, f"entry {number}: output {output} must be a relative path without '..'"
            )
        image = Path(row["image"])
        key = output or (image if _inside(image) else Path(image.name))
        pairs.append(
            Pair(key.with_suffix("").as_posix(), base / image, base / row["unary"], output)
        )
    return pairs


def _inside(path: Path) -> bool:
    """Whether ``path`` stays inside the directory it is relative to."""
    return not path.is_absolute() and ".." not in path.parts


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise BadInputError(path, f"cannot read: {exc.strerror}") from exc


def _csv_rows(source: str, text: str):
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"image", "unary"} <= set(reader.fieldnames):
        raise BadInputError(source, "CSV manifest needs a header with columns image,unary[,output]")
    return [(i + 2, row) for i, row in enumerate(reader)]


def _jsonl_rows(source: str, text: str):
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(source, f"line {i + 1}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise BadInputError(source, f"line {i + 1}: expected a JSON object")
        rows.append((i + 1, row))
    return rows


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise BadInputError(None, f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise BadInputError(None, f"--shard {text}: need 0 <= I < N")
    return index, count


def shard_of(key: str, count: int) -> int:
    """Stable shard of an item: a hash of its key, the same on every machine and run."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(pairs: list[Pair], index: int, count: int) -> list[Pair]:
    return [p for p in pairs if shard_of(p.key, count) == index]


def plan_outputs(
    pairs: list[Pair],
    out_dir: Path,
    out_suffix: str = ".png",
    overlay_dir: Path | None = None,
    probs_dir: Path | None = None,
) -> list[BatchItem]:
    """Decide every output path (relative paths kept) and reject collisions before any work:
    two inputs writing one file, or an output that would overwrite an input."""
    items = []
    owner: dict[Path, str] = {}
    inputs = {path.resolve() for pair in pairs for path in (pair.image, pair.unary)}
    for pair in pairs:
        output = out_dir / (pair.output or f"{pair.key}{out_suffix}")
        item = BatchItem(
            pair.key,
            pair.image,
            pair.unary,
            output,
            overlay_dir / f"{pair.key}.png" if overlay_dir else None,
            probs_dir / f"{pair.key}.npy" if probs_dir else None,
        )
        for path in item.outputs():
            resolved = path.resolve()
            if resolved in inputs:
                raise BadInputError(path, "output would overwrite an input file")
            if resolved in owner:
                raise BadInputError(
                    path, f"two inputs write here: {owner[resolved]} and {pair.image}"
                )
            owner[resolved] = str(pair.image)
        items.append(item)
    return items
