"""``convcrf synth OUT_DIR``: write a synthetic dataset (the paper's synthetic task)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from convcrf_cli.commands.common import echo_err, reports_errors, some_paths
from convcrf_cli.errors import BadInputError
from convcrf_cli.synthetic import SUBDIRECTORIES, foreign_files, write_dataset


def _parse_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    """``HxW`` -> (height, width), both positive."""
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 375x500, got {value!r}")
    height, width = (int(p) for p in parts)
    if height < 1 or width < 1:
        raise click.BadParameter(f"height and width must be positive, got {value!r}")
    return height, width


@click.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--count", type=click.IntRange(min=1), default=20, show_default=True, help="Number of samples."
)
@click.option(
    "--size",
    "size",
    default="240x320",
    show_default=True,
    callback=_parse_size,
    help="Image size as HEIGHTxWIDTH.",
)
@click.option(
    "--classes",
    type=click.IntRange(2, 256),
    default=21,
    show_default=True,
    help="Number of classes (label ids 0..C-1), 2 to 256.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Random seed; sample i depends only on (seed, i).",
)
@reports_errors
def synth_command(
    out_dir: Path, count: int, size: tuple[int, int], classes: int, seed: int
) -> None:
    """Write a synthetic segmentation dataset with known labels to OUT_DIR.

    Each sample NAME has OUT_DIR/images/NAME.png (a generated scene of coloured regions),
    OUT_DIR/labels/NAME.png (palette PNG whose pixel values are the class ids) and
    OUT_DIR/unaries/NAME.npy ([C,H,W] float32 probabilities: the labels one-hot encoded,
    downsampled x8 and back up, with 20% of the coarse cells replaced by a random class).
    Refining a unary with `convcrf refine` should recover the boundaries. OUT_DIR may hold an
    earlier run's files only where this run replaces them (the same or a larger --count).
    """
    for directory in (out_dir, *(out_dir / sub for sub in SUBDIRECTORIES)):
        # os.path: False where it cannot be looked at (Path raises before Python 3.12)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise BadInputError(directory, "exists and is not a directory")
    foreign = foreign_files(out_dir, count)
    if foreign:
        raise BadInputError(
            out_dir,
            f"holds {len(foreign)} file(s) that this run would not replace "
            f"({some_paths(foreign)}): the dataset would mix two runs; use an empty directory",
        )
    try:
        names = write_dataset(out_dir, count, size[0], size[1], classes, seed)
    except OSError as exc:
        raise BadInputError(out_dir, f"cannot write dataset: {exc.strerror or exc}") from exc
    echo_err(f"wrote {len(names)} samples to {out_dir}")
