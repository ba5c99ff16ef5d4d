"""The paper's synthetic task on generated scenes with known labels (README, "Sample data and
the synthetic task").

A scene is a set of piecewise-smooth coloured regions (warped Voronoi cells with ellipses and
star-shaped polygons on top), each with its own colour, a mild colour gradient, a smooth
low-frequency texture and pixel noise, so that region boundaries are visible in colour as in a
photograph. Each region carries a class label.

The unary follows the original ConvCRF benchmark: one-hot encode the labels, downsample ×8
bilinearly (antialiased) and back up, with a random 20% of the coarse cells replaced by the
one-hot code of a random class. The result is a blocky, boundary-blind probability map that the
CRF should sharpen using the image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from convcrf_cli.atomic import staged_outputs, write_npy
from convcrf_cli.errors import RuntimeFailure
from convcrf_cli.outputs import missing_directories, remove_empty_directories
from convcrf_cli.palette import palette_png

MIN_COLOUR_DISTANCE = 40.0
"""Smallest RGB distance between the base colours of two regions of a scene."""
GRAIN_MAX = 40.0
"""Largest amplitude of a region's fine texture (RGB units)."""
SUBDIRECTORIES = ("images", "unaries", "labels")
"""The directories of a dataset that :func:`write_dataset` writes, under its ``out_dir``."""


def random_scene(
    rng: np.random.Generator, height: int, width: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one scene with known labels.

    Returns ``image [H,W,3] uint8`` and ``labels [H,W] uint8`` with class ids in
    ``[0, num_classes)``. Each region's class is drawn uniformly, so scenes of a few regions
    show a few of the classes.
    """
    if height < 1 or width < 1:
        raise ValueError(f"scene size must be positive, got {height}x{width}")
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must lie in [1, 256] for uint8 labels, got {num_classes}")
    regions = _region_map(rng, height, width)
    count = int(regions.max()) + 1
    classes = rng.integers(0, num_classes, count).astype(np.uint8)
    return _paint(rng, regions, count), classes[regions]


def noisy_unary(
    labels: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    downsample: int = 8,
    noise_fraction: float = 0.2,
) -> np.ndarray:
    """Unary probabilities ``[C,H,W] float32`` from ``labels [H,W]`` (integers in ``[0, C)``).

    The one-hot labels are downsampled by ``downsample`` bilinearly (antialiased, coarse grid
    ``max(1, H // downsample) × max(1, W // downsample)``); ``round(noise_fraction · cells)``
    coarse cells, chosen at random, are replaced by the one-hot code of a class drawn uniformly
    (possibly the true one); the grid is upsampled bilinearly back to H×W. Probabilities are
    non-negative and sum to 1 over classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H,W], got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got max {labels.max()}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must lie in [0, 1], got {noise_fraction}")
    height, width = labels.shape
    coarse_h, coarse_w = max(1, height // downsample), max(1, width // downsample)
    coarse = np.stack(
        [_resize(labels == c, coarse_h, coarse_w) for c in range(num_classes)], axis=-1
    )
    cells = coarse_h * coarse_w
    replaced = rng.choice(cells, size=round(noise_fraction * cells), replace=False)
    flat = coarse.reshape(cells, num_classes)
    flat[replaced] = np.eye(num_classes, dtype=np.float32)[
        rng.integers(0, num_classes, replaced.size)
    ]
    probs = np.stack([_resize(coarse[..., c], height, width) for c in range(num_classes)])
    probs = np.clip(probs, 0.0, None)
    return (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)


def write_dataset(
    out_dir: str | Path, count: int, height: int, width: int, num_classes: int, seed: int
) -> list[str]:
    """Write ``count`` synthetic samples under ``out_dir`` and return their names.

    Files per sample NAME: ``images/NAME.png`` (RGB), ``unaries/NAME.npy`` (``[C,H,W]``
    float32 probabilities) and ``labels/NAME.png`` (palette PNG in Pascal VOC colours whose
    pixel values are the class ids). Sample ``i`` depends only on ``(seed, i)``. At least two
    classes: a one-channel unary would be read as a foreground score (two classes). Each
    sample's files are written together or not at all; a failed write raises
    :class:`RuntimeFailure` naming the file (and removes the directories made here when no
    sample was written).
    """
    if num_classes < 2:
        raise ValueError(f"a dataset needs at least 2 classes, got {num_classes}")
    out_dir = Path(out_dir)
    # missing_directories takes files: a name inside each subdirectory counts it too
    created = missing_directories(out_dir / sub / "x" for sub in SUBDIRECTORIES)
    try:
        for sub in SUBDIRECTORIES:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_empty_directories(created)
        raise
    names = []
    for index in range(count):
        name = f"synth_{index:05d}"
        image, labels, unary = synthetic_sample(seed, index, height, width, num_classes)
        try:
            _write_sample(out_dir, name, image, labels, unary)
        except RuntimeFailure:
            if not names:
                remove_empty_directories(created)
            raise
        names.append(name)
    return names


def _write_sample(
    out_dir: Path, name: str, image: np.ndarray, labels: np.ndarray, unary: np.ndarray
) -> None:
    """The three files of one sample, all or none; a failed write is a
    :class:`RuntimeFailure` naming the file."""
    files = {
        out_dir / "images" / f"{name}.png": lambda h: Image.fromarray(image).save(h, "PNG"),
        out_dir / "unaries" / f"{name}.npy": lambda h: write_npy(h, unary),
        out_dir / "labels" / f"{name}.png": lambda h: h.write(palette_png(labels)),
    }
    writing = out_dir  # what the error names: the file being written, else the directory
    try:
        with staged_outputs() as staged:
            for writing, fill in files.items():
                with staged.output(writing) as handle:
                    fill(handle)
            writing = out_dir  # the staged files are renamed together on leaving the block
    except OSError as exc:
        raise RuntimeFailure(f"{writing}: cannot write: {exc.strerror or exc}") from exc


def foreign_files(out_dir: str | Path, count: int) -> list[Path]:
    """Files in ``out_dir``'s ``images``, ``unaries`` and ``labels`` that
    :func:`write_dataset` with ``count`` samples would not replace (sorted): samples of an
    earlier, larger run, or anything else."""
    written = {f"synth_{index:05d}" for index in range(count)}
    suffixes = {"images": ".png", "unaries": ".npy", "labels": ".png"}
    found = []
    for sub, suffix in suffixes.items():
        directory = Path(out_dir) / sub
        if os.path.isdir(directory):  # False where it cannot be looked at
            found += [
                path
                for path in directory.iterdir()
                if not (path.suffix == suffix and path.stem in written and path.is_file())
            ]
    return sorted(found)


def synthetic_sample(
    seed: int, index: int, height: int, width: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``index`` of the dataset ``seed``: ``image [H,W,3] uint8``,
    ``labels [H,W] uint8`` and unary probabilities ``[C,H,W] float32``."""
    rng = np.random.default_rng([seed, index])
    image, labels = random_scene(rng, height, width, num_classes)
    return image, labels, noisy_unary(labels, num_classes, rng)


def _region_map(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Region ids ``[H,W] int64`` numbered from 0: warped Voronoi cells, then shapes on top."""
    size = max(height, width)
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    # Warp the coordinates with a smooth field so that boundaries curve like object outlines.
    rows = rows + 0.04 * size * _smooth_noise(rng, height, width, 4)
    cols = cols + 0.04 * size * _smooth_noise(rng, height, width, 4)
    seeds = rng.uniform((0, 0), (height, width), (int(rng.integers(3, 8)), 2))
    dist2 = (rows[None] - seeds[:, :1, None]) ** 2 + (cols[None] - seeds[:, 1:, None]) ** 2
    regions = dist2.argmin(axis=0)
    next_id = len(seeds)
    for _ in range(int(rng.integers(3, 10))):
        inside = _random_shape(rng, rows, cols, size)
        if inside.any():
            regions[inside] = next_id
            next_id += 1
    # Renumber so that ids are 0..count-1 even where a shape covered a whole cell.
    _, regions = np.unique(regions, return_inverse=True)
    return regions.reshape(height, width)


def _random_shape(
    rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray, size: int
) -> np.ndarray:
    """Mask ``[H,W] bool`` of a rotated ellipse or a star-shaped polygon at a random place."""
    height, width = rows.shape
    centre_r, centre_c = rng.uniform(0, height), rng.uniform(0, width)
    dr, dc = rows - centre_r, cols - centre_c
    angle = rng.uniform(0, math.pi)
    u = dr * math.cos(angle) + dc * math.sin(angle)
    v = -dr * math.sin(angle) + dc * math.cos(angle)
    radius = rng.uniform(0.05, 0.25) * size
    if rng.random() < 0.5:
        aspect = rng.uniform(0.4, 1.0)
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0
    # Star-shaped polygon: vertices at sorted angles with random radii, linear in between.
    vertices = int(rng.integers(3, 9))
    vertex_angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
    vertex_radii = radius * rng.uniform(0.5, 1.0, vertices)
    theta = np.arctan2(v, u) % (2 * math.pi)
    boundary = np.interp(
        theta,
        np.concatenate([vertex_angles - 2 * math.pi, vertex_angles, vertex_angles + 2 * math.pi]),
        np.tile(vertex_radii, 3),
    )
    return np.hypot(u, v) <= boundary


def _paint(rng: np.random.Generator, regions: np.ndarray, count: int) -> np.ndarray:
    """Colour ``count`` regions (base, gradient, texture, noise) as ``[H,W,3] uint8``."""
    height, width = regions.shape
    base = _distinct_colours(rng, count)  # [count,3]
    gradient = rng.uniform(-25, 25, (count, 2, 3))  # per region, per axis, per channel
    rows = (np.arange(height) / max(height - 1, 1) - 0.5)[:, None, None]
    cols = (np.arange(width) / max(width - 1, 1) - 0.5)[None, :, None]
    image = base[regions] + rows * gradient[regions, 0] + cols * gradient[regions, 1]
    # Texture: a smooth shading field everywhere, plus fine grain (features of a few pixels)
    # whose strength varies by region, as between sky, cloth and foliage.
    shading = np.stack([_smooth_noise(rng, height, width, 12) for _ in range(3)], axis=-1)
    grain_cells = max(4, max(height, width) // 4)
    grain = np.stack([_smooth_noise(rng, height, width, grain_cells) for _ in range(3)], axis=-1)
    grain_strength = rng.uniform(0.0, GRAIN_MAX, count)[regions][..., None]
    image = image + 8.0 * shading + grain_strength * grain + rng.normal(0.0, 6.0, image.shape)
    # A slight blur softens the edges as a camera's optics would.
    image = _box_blur3(image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _distinct_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """``[count,3] float64`` RGB colours, pairwise at least MIN_COLOUR_DISTANCE apart where a
    few hundred draws can find one."""
    colours: list[np.ndarray] = []
    for _ in range(count):
        candidates = rng.uniform(25, 230, (300, 3))
        if colours:
            gaps = np.linalg.norm(candidates[:, None] - np.array(colours)[None], axis=-1)
            far = np.flatnonzero(gaps.min(axis=1) >= MIN_COLOUR_DISTANCE)
            pick = far[0] if far.size else int(gaps.min(axis=1).argmax())
        else:
            pick = 0
        colours.append(candidates[pick])
    return np.array(colours)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth random field ``[H,W] float64`` in about [-1, 1]: a ``cells``-wide grid upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    field = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float64)


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one ``[h,w]`` plane to ``[height,width] float32`` (antialiased when
    shrinking)."""
    image = Image.fromarray(np.asarray(plane, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _box_blur3(image: np.ndarray) -> np.ndarray:
    """3×3 mean of ``[H,W,3]`` with edge replication."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    total = sum(padded[a : a + height, c : c + width] for a in range(3) for c in range(3))
    return total / 9.0
