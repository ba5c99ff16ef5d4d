"""``convcrf batch``: refine a whole dataset, resumably, with a progress bar and a report."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
from tqdm import tqdm

from convcrf_cli import batch_items
from convcrf_cli.atomic import atomic_write_bytes
from convcrf_cli.backends import select_backend
from convcrf_cli.batch_items import BatchItem, Pairing
from convcrf_cli.batch_runner import (
    DEFAULT_JOBS,
    DONE,
    FAILED,
    SKIPPED,
    BatchSettings,
    BatchStats,
    ItemReport,
    run_batch,
)
from convcrf_cli.commands.common import (
    DEVICE_HELP,
    check_output_file,
    crf_options,
    device_option,
    echo_err,
    fail,
    output_format_options,
    params_from_options,
    report_tunings,
    reports_errors,
    tune_option,
    unary_options,
    unary_options_from,
)
from convcrf_cli.errors import BadInputError
from convcrf_cli.outputs import OutputSpec
from convcrf_cli.pipeline import describe_backend

GPU_BATCH_SIZE = 8
PATHS_SHOWN = 10
"""Paths named in one message line (unpaired files, failed items); the report has all."""


class Terminated(Exception):
    """SIGTERM arrived (raised in the main thread by the signal handler)."""


class ReaderClosed(Exception):
    """The reader of the report on stdout closed the pipe."""


@click.command("batch")
@click.argument("sources", nargs=-1, metavar="[IMAGES_DIR] [UNARIES_DIR]")
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the label maps; relative paths of the inputs are kept.",
)
@click.option(
    "--manifest",
    default=None,
    help="CSV (header image,unary[,output]) or JSON Lines file of items, or - for stdin; "
    "replaces IMAGES_DIR and UNARIES_DIR.",
)
@click.option(
    "--from-list",
    "image_list",
    default=None,
    help="File of image paths, one per line, or - for stdin; each is paired with the unary "
    "of the same stem in UNARIES_DIR (the only argument then).",
)
@click.option(
    "--image-glob",
    default=None,
    help="Comma-separated patterns of image names, matched ignoring case.  "
    f"[default: {','.join(batch_items.IMAGE_GLOBS)}]",
)
@click.option(
    "--unary-glob",
    default=None,
    help="Comma-separated patterns of unary names, matched ignoring case.  "
    f"[default: {','.join(batch_items.UNARY_GLOBS)}]",
)
@click.option(
    "--out-format",
    type=click.Choice(("png", "npy")),
    default="png",
    show_default=True,
    help="Label maps as palette PNGs or [H,W] int32 .npy files.",
)
@click.option(
    "--overlay-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write colour overlays (.png) here.",
)
@click.option(
    "--probs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write refined probabilities (.npy, the layout of each unary) here.",
)
@output_format_options
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=DEFAULT_JOBS,
    show_default=True,
    help="I/O worker threads decoding inputs and encoding outputs while the CRF runs.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help=f"Most same-sized images refined in one CRF call.  [default: {GPU_BATCH_SIZE} on "
    "CUDA, 1 on the CPU]",
)
@click.option(
    "--skip-existing",
    is_flag=True,
    help="Leave items whose outputs all exist (resume an interrupted run).",
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first item that fails.")
@click.option(
    "--report",
    "report_path",
    default=None,
    help="Write one JSON line per item (paths, status, error, seconds, label histograms before "
    "and after) to this file, or - for stdout as items finish.",
)
@click.option(
    "--shard",
    default=None,
    help="I/N: refine only shard I of N (0-based), a stable share by hash of each item's "
    "relative path; N runs with I = 0..N-1 cover every item once.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@unary_options
@device_option(DEVICE_HELP)
@tune_option
@click.option("-v", "--verbose", is_flag=True, help="Report the device and every item.")
@crf_options
@reports_errors
def batch_command(
    sources: tuple[str, ...],
    output_dir: Path,
    manifest: str | None,
    image_list: str | None,
    image_glob: str | None,
    unary_glob: str | None,
    out_format: str,
    overlay_dir: Path | None,
    probs_dir: Path | None,
    jobs: int,
    batch_size: int | None,
    skip_existing: bool,
    fail_fast: bool,
    report_path: str | None,
    shard: str | None,
    quiet: bool,
    device: str,
    tune: bool,
    verbose: bool,
    **options: object,
) -> None:
    """Refine every image of a dataset: IMAGES_DIR/REL.jpg with UNARIES_DIR/REL.npy, written to
    OUTPUT_DIR/REL.png (pairing by relative path and stem).

    Inputs and unaries are read as `convcrf refine` reads them. Each output is written to a
    temporary name and renamed, so an interrupted run leaves no partial file; run again with
    --skip-existing to resume. A failing item is reported and the batch goes on.

    Exit status: 0 every item done or skipped, 1 an item failed, 2 bad usage or input before
    any work (collisions, unreadable manifest), 130 interrupted, 143 terminated.
    """
    params = params_from_options(options)
    unary = unary_options_from(options)
    spec_options = {"probs_dtype": options.pop("probs_dtype"), "alpha": options.pop("alpha")}
    pairing = _pairing(sources, manifest, image_list, image_glob, unary_glob)
    _report_unpaired(pairing)
    if not pairing.pairs:
        raise BadInputError(None, "no image/unary pairs found")
    report_file = None if report_path in (None, "-") else Path(report_path)
    items = batch_items.plan_outputs(
        pairing.pairs,
        output_dir,
        f".{out_format}",
        overlay_dir,
        probs_dir,
        report=report_file,
        inputs=_other_inputs(pairing, manifest, image_list),
    )
    if report_file is not None:
        check_output_file(report_file)
    if shard is not None:
        items = batch_items.select_shard(items, *batch_items.parse_shard(shard))
    backend = select_backend(device, tune=tune)
    settings = BatchSettings(
        jobs=jobs,
        batch_size=batch_size or (GPU_BATCH_SIZE if backend.name == "cuda" else 1),
        skip_existing=skip_existing,
        fail_fast=fail_fast,
    )
    if verbose:
        echo_err(
            f"convcrf: device: {describe_backend(backend)}; {len(items)} items, "
            f"{settings.jobs} I/O workers, up to {settings.batch_size} per CRF call"
        )

    def spec_for(item: BatchItem) -> OutputSpec:
        return OutputSpec(
            labels=item.output, overlay=item.overlay, probs=item.probs, **spec_options
        )

    stats = BatchStats()
    reports: list[ItemReport] = []
    start = time.perf_counter()
    stopped: tuple[str, int] | None = None
    stream_report = report_path == "-"
    with (
        _signals_raise(),
        tqdm(
            total=len(items),
            unit="img",
            desc="convcrf",
            disable=quiet or not sys.stderr.isatty(),
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar,
    ):
        try:
            runner = run_batch(items, spec_for, params, backend, unary, settings, stats)
            with contextlib.closing(runner):
                for report in runner:
                    reports.append(report)
                    bar.update(1)
                    _echo_item(report, verbose, bar)
                    if stream_report:
                        _echo_record(report)
        except KeyboardInterrupt:
            stopped = ("interrupted", 130)
        except Terminated:
            stopped = ("terminated", 143)
        except ReaderClosed:
            stopped = ("stdout: the reader closed the pipe", 1)
    wall = time.perf_counter() - start
    if verbose:
        report_tunings(backend)
    if report_file is not None:
        _write_report(report_file, reports, pairing)
    if not quiet:
        _summary(reports, len(items), wall, stats, describe_backend(backend))
    if stopped is not None:
        fail(*stopped)
    failed = [str(r.item.image) for r in reports if r.status == FAILED]
    if failed:
        fail(f"{len(failed)} of {len(items)} items failed: {_some(failed)}", 1)


def _pairing(
    sources: tuple[str, ...],
    manifest: str | None,
    image_list: str | None,
    image_glob: str | None,
    unary_glob: str | None,
) -> Pairing:
    """Items from two directories, a manifest, or a list of images and a unary directory."""
    if manifest is not None and image_list is not None:
        raise click.UsageError("give --manifest or --from-list, not both")
    if manifest is not None:
        if sources:
            raise click.UsageError("--manifest replaces IMAGES_DIR and UNARIES_DIR")
        return Pairing(batch_items.read_manifest(manifest), [], [])
    unary_globs = batch_items.split_globs(unary_glob, batch_items.UNARY_GLOBS)
    if image_list is not None:
        if len(sources) != 1:
            raise click.UsageError("--from-list takes one argument: UNARIES_DIR")
        lines = batch_items.read_lines(image_list)
        return batch_items.pair_image_list(lines, Path(sources[0]), unary_globs)
    if len(sources) != 2:
        raise click.UsageError("give IMAGES_DIR and UNARIES_DIR, --manifest, or --from-list")
    image_globs = batch_items.split_globs(image_glob, batch_items.IMAGE_GLOBS)
    return batch_items.pair_directories(
        Path(sources[0]), Path(sources[1]), image_globs, unary_globs
    )


def _other_inputs(pairing: Pairing, manifest: str | None, image_list: str | None) -> list[Path]:
    """Input files besides the pairs': unpaired files, the manifest or the list of images."""
    lists = [Path(name) for name in (manifest, image_list) if name not in (None, "-")]
    return [*pairing.unpaired_images, *pairing.unpaired_unaries, *lists]


def _report_unpaired(pairing: Pairing) -> None:
    for paths, missing in (
        (pairing.unpaired_images, "unary"),
        (pairing.unpaired_unaries, "image"),
    ):
        if not paths:
            continue
        echo_err(f"convcrf: warning: {len(paths)} file(s) without {missing}: {_some(paths)}")


def _some(paths: list) -> str:
    """The first :data:`PATHS_SHOWN` of ``paths``, comma-separated, and how many more."""
    shown = ", ".join(str(path) for path in paths[:PATHS_SHOWN])
    more = len(paths) - PATHS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread while the batch runs."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _echo_item(report: ItemReport, verbose: bool, bar: tqdm) -> None:
    if report.status == FAILED:
        bar.write(f"convcrf: error: {report.error}", file=sys.stderr)
    elif verbose:
        seconds = f" in {report.result.seconds:.3f} s" if report.result else ""
        bar.write(f"convcrf: {report.status}: {report.item.key}{seconds}", file=sys.stderr)
    if report.result is not None:
        for warning in report.result.warnings:
            bar.write(f"convcrf: warning: {warning}", file=sys.stderr)


def _echo_record(report: ItemReport) -> None:
    """Write the item's JSON line to stdout; raise :class:`ReaderClosed` if the reader closed
    the pipe (stdout then points at /dev/null, so that the final flush stays quiet)."""
    try:
        click.echo(json.dumps(report.to_json()))
    except BrokenPipeError as exc:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise ReaderClosed() from exc


def _write_report(path: Path, reports: list[ItemReport], pairing: Pairing) -> None:
    lines = [json.dumps(report.to_json()) for report in reports]
    for image in pairing.unpaired_images:
        lines.append(json.dumps({"image": str(image), "status": "unpaired", "error": "no unary"}))
    for unary in pairing.unpaired_unaries:
        lines.append(json.dumps({"unary": str(unary), "status": "unpaired", "error": "no image"}))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    except OSError as exc:
        fail(f"{path}: cannot write the report: {exc.strerror or exc}", 1)


def _summary(
    reports: list[ItemReport],
    total: int,
    wall: float,
    stats: BatchStats,
    device: str,
) -> None:
    counts = {
        status: sum(r.status == status for r in reports) for status in (DONE, SKIPPED, FAILED)
    }
    rate = counts[DONE] / wall if wall > 0 else 0.0
    not_run = total - len(reports)
    share = 100.0 * stats.crf_seconds / wall if wall > 0 else 0.0
    io_share = 100.0 * stats.io_wait_seconds / wall if wall > 0 else 0.0
    echo_err(
        f"convcrf: {counts[DONE]} done, {counts[SKIPPED]} skipped, {counts[FAILED]} failed"
        + (f", {not_run} not run" if not_run else "")
        + f" in {wall:.1f} s ({rate:.2f} images/s; CRF {share:.0f}% of the time on {device}, "
        f"waiting for I/O {io_share:.0f}%)"
    )
