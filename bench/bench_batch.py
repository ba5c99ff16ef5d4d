"""Batch throughput benchmark (`make bench`): images/s of `convcrf batch`'s runner and the share
of wall time spent in the CRF, for one I/O worker and for the default number.

Data: ``--items`` (200) generated Pascal VOC-sized items: 500×375 JPEG images (quality 90) and
``[21,375,500] float32`` probability ``.npy`` files (15.8 MB each), synthetic scenes from
:mod:`convcrf_cli.synthetic` (a few distinct scenes repeated under different names). Outputs:
palette PNG label maps. Parameters: the defaults. The files are read back from the page cache
after the first run; the benchmark measures decoding, conversion and encoding, not the disk.

    .venv/bin/python bench/bench_batch.py [--items 200] [--data DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from convcrf_cli.backends import select_backend
from convcrf_cli.batch_items import pair_directories, plan_outputs
from convcrf_cli.batch_runner import DEFAULT_JOBS, DONE, BatchSettings, BatchStats, run_batch
from convcrf_cli.core import refine
from convcrf_cli.outputs import OutputSpec
from convcrf_cli.params import CRFParams
from convcrf_cli.pipeline import UnaryOptions, describe_backend, refine_item
from convcrf_cli.synthetic import synthetic_sample

HEIGHT, WIDTH, CLASSES, DISTINCT = 375, 500, 21, 8


def write_items(root: Path, count: int) -> None:
    """``root/images/NNNN.jpg`` and ``root/unaries/NNNN.npy`` for ``count`` items."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "unaries").mkdir(exist_ok=True)
    samples = [synthetic_sample(0, i, HEIGHT, WIDTH, CLASSES) for i in range(DISTINCT)]
    for index in range(count):
        image, _, probs = samples[index % DISTINCT]
        Image.fromarray(image).save(root / "images" / f"{index:04d}.jpg", quality=90)
        np.save(root / "unaries" / f"{index:04d}.npy", probs)


def run(root: Path, out: Path, jobs: int, limit: int | None = None) -> tuple[float, BatchStats]:
    """One batch over ``root`` (its first ``limit`` items); returns the wall time and the
    runner's stats."""
    shutil.rmtree(out, ignore_errors=True)
    pairing = pair_directories(root / "images", root / "unaries")
    items = plan_outputs(pairing.pairs[:limit], out, ".png")
    stats = BatchStats()
    backend = select_backend("cpu")
    settings = BatchSettings(jobs=jobs)
    start = time.perf_counter()
    runner = run_batch(
        items, lambda item: OutputSpec(item.output), CRFParams(), backend, UnaryOptions(),
        settings, stats,
    )  # fmt: skip
    with contextlib.closing(runner):
        statuses = [report.status for report in runner]
    wall = time.perf_counter() - start
    if statuses.count(DONE) != len(items):
        sys.exit(f"bench_batch: only {statuses.count(DONE)} of {len(items)} items done")
    return wall, stats


def run_sequential(root: Path, out: Path) -> float:
    """The same items one after another in one thread (read, CRF, write): no overlap."""
    shutil.rmtree(out, ignore_errors=True)
    items = plan_outputs(pair_directories(root / "images", root / "unaries").pairs, out, ".png")
    backend = select_backend("cpu")
    start = time.perf_counter()
    for item in items:
        refine_item(item.image, item.unary, OutputSpec(item.output), CRFParams(), backend)
    return time.perf_counter() - start


def crf_alone_seconds(count: int) -> float:
    """The CRF on ``count`` items already in memory: the bound for any batch."""
    backend = select_backend("cpu")
    samples = [synthetic_sample(0, i, HEIGHT, WIDTH, CLASSES) for i in range(DISTINCT)]
    inputs = [(image, np.log(np.maximum(probs, 1e-6))) for image, _, probs in samples]
    start = time.perf_counter()
    for index in range(count):
        image, logits = inputs[index % DISTINCT]
        refine(image, logits, CRFParams(), backend)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--data", type=Path, default=None, help="keep the generated data here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convcrf-bench-") as scratch:
        root = args.data or Path(scratch)
        if not (root / "images").is_dir() or len(list((root / "images").iterdir())) < args.items:
            write_items(root, args.items)
        out = Path(scratch) / "out"
        run(root, out, DEFAULT_JOBS, limit=10)  # allocator, threads
        print(
            f"{args.items} items {WIDTH}x{HEIGHT} JPEG + [{CLASSES},{HEIGHT},{WIDTH}] float32 .npy "
            f"-> palette PNG; default parameters on {describe_backend(select_backend('cpu'))}\n"
        )
        print("| run | images/s | wall (s) | CRF share of wall time | CRF waiting for I/O |")
        print("|---|---:|---:|---:|---:|")
        crf = crf_alone_seconds(args.items)
        rows = [("CRF alone (inputs in memory, no I/O)", crf, 0.0)]
        rows.append(("one thread: read, CRF, write in turn", run_sequential(root, out), None))
        for jobs in sorted({1, DEFAULT_JOBS}):
            wall, stats = run(root, out, jobs)
            default = " (default)" if jobs == DEFAULT_JOBS else ""
            rows.append((f"batch --jobs {jobs}{default}", wall, stats.io_wait_seconds))
        for name, wall, waiting in rows:
            wait_text = "-" if waiting is None else f"{100 * waiting / wall:.0f}%"
            print(
                f"| {name} | {args.items / wall:.2f} | {wall:.1f} | {100 * crf / wall:.0f}% "
                f"| {wait_text} |"
            )
        print(
            "\nCRF share: the time of the CRF alone on the same items over the run's wall time "
            "(the rest is I/O and its contention for the cores). CRF waiting for I/O: time the "
            "compute stage waited for decoded inputs or free output slots."
        )


if __name__ == "__main__":
    main()
