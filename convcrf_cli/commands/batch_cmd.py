"""``convcrf batch``: refine a whole dataset, resumably, with a progress bar and a report."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from convcrf_cli import batch_items, batch_report
from convcrf_cli.backends import Backend, select_backend
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
    crf_options,
    device_line,
    device_option,
    echo_err,
    echo_out,
    fail,
    one_stdin_reader,
    output_format_options,
    params_from_options,
    report_tunings,
    reports_errors,
    some_paths,
    tune_option,
    unary_options,
    unary_options_from,
)
from convcrf_cli.errors import BadInputError, RuntimeFailure
from convcrf_cli.outputs import (
    OutputSpec,
    check_output_directory,
    check_output_file,
)
from convcrf_cli.pipeline import describe_backend

GPU_BATCH_SIZE = 8


class Terminated(Exception):
    """SIGTERM arrived (raised in the main thread by the signal handler)."""


class StdoutFailed(Exception):
    """The report could not be written to stdout (a reader that closed the pipe, a full
    disk); the message says which."""


def _parse_shard(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    """``--shard I/N`` -> (I, N), a usage error naming the option when it is malformed."""
    if value is None:
        return None
    try:
        return batch_items.parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


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
    callback=_parse_shard,
    help="I/N: refine only shard I of N (0-based), a stable share by hash of each item's "
    "relative path; N runs with I = 0..N-1 cover every item once.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@unary_options
@device_option(DEVICE_HELP)
@tune_option
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Report the device, and every item with the notes on its inputs (as refine -v).",
)
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
    shard: tuple[int, int] | None,
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

    Exit status: 0 every item done or skipped, 1 an item failed (or, with --from-list, a listed
    image has no unary), 2 bad usage or input before any work (collisions, unreadable manifest,
    an output directory that cannot be written), 130 interrupted, 143 terminated.
    """
    one_stdin_reader(
        {"--manifest": manifest, "--from-list": image_list, "--params": options.get("params_file")}
    )
    params = params_from_options(options)
    unary = unary_options_from(options)
    spec_for = _output_specs(options)
    outputs = [(output_dir, f".{out_format}"), (overlay_dir, ".png"), (probs_dir, ".npy")]
    written = [(directory, suffix) for directory, suffix in outputs if directory is not None]
    pairing, other_inputs = _find_pairs(
        sources, manifest, image_list, image_glob, unary_glob, written, shard
    )
    report_file = None if report_path in (None, "-") else Path(report_path)
    items = _plan_items(
        pairing, output_dir, out_format, overlay_dir, probs_dir, report_file, other_inputs, shard
    )
    backend = select_backend(device, tune=tune)
    settings = BatchSettings(
        jobs=jobs,
        batch_size=batch_size or (GPU_BATCH_SIZE if backend.name == "cuda" else 1),
        skip_existing=skip_existing,
        fail_fast=fail_fast,
    )
    if verbose:
        echo_err(
            f"{device_line(backend)}; {len(items)} items, {settings.jobs} I/O workers, up to "
            f"{settings.batch_size} per CRF call"
        )
    stats = BatchStats()
    to_run = [] if fail_fast and pairing.missing_images else items  # a failure before the run
    runner = run_batch(to_run, spec_for, params, backend, unary, settings, stats)
    stream = batch_report.pairing_records(pairing) if report_path == "-" else None
    outcome = _run(runner, stats, len(items), stream, quiet=quiet, verbose=verbose)
    listed = image_list is not None
    _finish(outcome, pairing, report_file, backend, quiet=quiet, verbose=verbose, listed=listed)


def _output_specs(options: dict[str, Any]) -> Callable[[BatchItem], OutputSpec]:
    """Pop ``--probs-dtype`` and ``--alpha`` from ``options``: the outputs of an item."""
    spec_options = {"probs_dtype": options.pop("probs_dtype"), "alpha": options.pop("alpha")}

    def spec_for(item: BatchItem) -> OutputSpec:
        return OutputSpec(
            labels=item.output, overlay=item.overlay, probs=item.probs, **spec_options
        )

    return spec_for


def _find_pairs(
    sources: tuple[str, ...],
    manifest: str | None,
    image_list: str | None,
    image_glob: str | None,
    unary_glob: str | None,
    outputs: list[tuple[Path, str]],
    shard: tuple[int, int] | None,
) -> tuple[Pairing, list[Path]]:
    """The pairing of this shard (see :func:`_pairing`), its unpaired and missing files
    reported on stderr, and the input files besides the pairs' (of every shard: see
    :func:`_other_inputs`). Raises :class:`BadInputError` if there is nothing to refine."""
    found = _pairing(sources, manifest, image_list, image_glob, unary_glob, outputs)
    pairing = found if shard is None else batch_items.select_unpaired_shard(found, *shard)
    _report_unpaired(pairing)
    _report_missing(pairing)
    if not pairing.pairs and image_list is None:  # a list's missing/unpaired images fail
        raise _nothing_to_refine(found, sources, manifest)
    return pairing, _other_inputs(found, manifest, image_list)


def _plan_items(
    pairing: Pairing,
    output_dir: Path,
    out_format: str,
    overlay_dir: Path | None,
    probs_dir: Path | None,
    report_file: Path | None,
    other_inputs: list[Path],
    shard: tuple[int, int] | None,
) -> list[BatchItem]:
    """The items of this shard with their output paths, once checked: no two outputs (the
    report file included) are one file, none overwrites an input, and the report file and
    every output directory can be written (:class:`BadInputError` otherwise). Creates
    nothing."""
    items = batch_items.plan_outputs(
        pairing.pairs,
        output_dir,
        f".{out_format}",
        overlay_dir,
        probs_dir,
        report=report_file,
        inputs=other_inputs,
    )
    if report_file is not None:
        check_output_file(report_file)
    if shard is not None:
        items = batch_items.select_shard(items, *shard)
    _check_output_directories(items)
    return items


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What a run did: the reports of its items (those completed while it stopped included)
    of ``total`` planned, what it measured, its wall-clock seconds and, if it stopped early,
    the message and exit status to stop with."""

    reports: list[ItemReport]
    total: int
    stats: BatchStats
    wall: float
    stopped: tuple[str, int] | None


def _run(
    runner: Iterator[ItemReport],
    stats: BatchStats,
    total: int,
    stream: list[dict] | None,
    *,
    quiet: bool,
    verbose: bool,
) -> _Outcome:
    """Run ``runner`` (a :func:`run_batch` filling ``stats``) under a progress bar of ``total``
    items, with each failure (every item with ``verbose``) on stderr and, unless ``stream`` is
    None, the report on stdout: the lines of ``stream`` (the pairing's) first, then each
    item's as it finishes. Ctrl-C, SIGTERM or a report that cannot be written to stdout stop
    the run early; the writes in flight finish and are reported."""
    reports: list[ItemReport] = []
    start = time.perf_counter()
    stopped: tuple[str, int] | None = None
    with (
        _signals_raise(),
        tqdm(
            total=total,
            unit="img",
            desc="convcrf",
            disable=quiet or not sys.stderr.isatty(),
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar,
    ):
        try:
            for record in stream or []:
                _echo_record(record)
            with contextlib.closing(runner):
                for report in runner:
                    reports.append(report)
                    bar.update(1)
                    _echo_item(report, verbose, bar)
                    if stream is not None:
                        _echo_record(batch_report.item_record(report))
        except KeyboardInterrupt:
            stopped = ("interrupted", 130)
        except Terminated:
            stopped = ("terminated", 143)
        except StdoutFailed as exc:
            stopped = (str(exc), 1)
    for report in stats.finished_while_stopping:  # written while the run stopped
        reports.append(report)
        if stream is not None and (stopped is None or stopped[1] != 1):  # 1: stdout failed
            with contextlib.suppress(StdoutFailed):
                _echo_record(batch_report.item_record(report))
    return _Outcome(reports, total, stats, time.perf_counter() - start, stopped)


def _finish(
    outcome: _Outcome,
    pairing: Pairing,
    report_file: Path | None,
    backend: Backend,
    *,
    quiet: bool,
    verbose: bool,
    listed: bool,
) -> None:
    """After the run: the tunings (with ``verbose``), the report file, the summary (unless
    ``quiet``) and the exit status: that of a run stopped early, else 1 if an item failed or,
    from a list (``listed``), a listed image has no unary."""
    if verbose:
        report_tunings(backend)
    if report_file is not None:
        item_records = (batch_report.item_record(report) for report in outcome.reports)
        _write_report(report_file, [*batch_report.pairing_records(pairing), *item_records])
    missing = pairing.missing_images
    if not quiet:
        _summary(outcome, describe_backend(backend), len(missing))
    if outcome.stopped is not None:
        fail(*outcome.stopped)
    failed = [*missing, *(r.item.image for r in outcome.reports if r.status == FAILED)]
    listed_unpaired = pairing.unpaired_images if listed else []
    _fail_if_incomplete(failed, outcome.total + len(missing), listed_unpaired)


def _pairing(
    sources: tuple[str, ...],
    manifest: str | None,
    image_list: str | None,
    image_glob: str | None,
    unary_glob: str | None,
    outputs: list[tuple[Path, str]],
) -> Pairing:
    """Items from two directories, a manifest, or a list of images and a unary directory;
    ``outputs`` (directory, suffix) are not searched for inputs."""
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
        return batch_items.pair_image_list(lines, Path(sources[0]), unary_globs, outputs)
    if len(sources) != 2:
        raise click.UsageError("give IMAGES_DIR and UNARIES_DIR, --manifest, or --from-list")
    image_globs = batch_items.split_globs(image_glob, batch_items.IMAGE_GLOBS)
    return batch_items.pair_directories(
        Path(sources[0]), Path(sources[1]), image_globs, unary_globs, outputs
    )


def _nothing_to_refine(
    pairing: Pairing, sources: tuple[str, ...], manifest: str | None
) -> BadInputError:
    """The error for a run of two directories or a manifest that found no image/unary pair,
    naming where it looked. A list of images is never one: an empty list is a run of no items
    (``find -newer`` found nothing new), its missing and unpaired images fail as items."""
    if manifest is not None:
        return BadInputError(None, "no image/unary pairs found")
    images, unaries = sources
    if not pairing.unpaired_images:
        return BadInputError(images, "no images found (see --image-glob)")
    return BadInputError(images, f"no image has a unary of the same relative path in {unaries}")


def _other_inputs(pairing: Pairing, manifest: str | None, image_list: str | None) -> list[Path]:
    """Input files besides the pairs': unpaired files, the manifest or the list of images."""
    lists = [Path(name) for name in (manifest, image_list) if name not in (None, "-")]
    return [*pairing.unpaired_images, *pairing.unpaired_unaries, *lists]


def _report_unpaired(pairing: Pairing) -> None:
    """One warning line for the images without a unary and one for the unaries without an
    image (their count and the first few paths)."""
    for paths, missing in (
        (pairing.unpaired_images, "unary"),
        (pairing.unpaired_unaries, "image"),
    ):
        if not paths:
            continue
        echo_err(f"convcrf: warning: {len(paths)} file(s) without {missing}: {some_paths(paths)}")


def _report_missing(pairing: Pairing) -> None:
    """One error line for each listed image that does not exist (a failed item)."""
    for image in pairing.missing_images:
        echo_err(f"convcrf: error: {batch_report.missing_image_error(image)}")


def _check_output_directories(items: list[BatchItem]) -> None:
    """Raise :class:`BadInputError` naming the first directory of the items' outputs that
    cannot be written (see :func:`check_output_directory`). Creates nothing."""
    for directory in sorted({path.parent for item in items for path in item.outputs()}):
        check_output_directory(directory)


def _fail_if_incomplete(failed: list[Path], total: int, listed_unpaired: list[Path]) -> None:
    """Exit with status 1 and one line naming the failed items (of ``total``) and the listed
    images without a unary, if there are any."""
    problems = []
    if failed:
        problems.append(f"{len(failed)} of {total} items failed: {some_paths(failed)}")
    if listed_unpaired:
        problems.append(
            f"{len(listed_unpaired)} listed image(s) without unary: {some_paths(listed_unpaired)}"
        )
    if problems:
        fail("; ".join(problems), 1)


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
    """An item's lines on stderr above the progress bar: its error if it failed (its status
    and the notes on its inputs with ``verbose``), then the warnings of its refinement."""
    if report.status == FAILED:
        bar.write(f"convcrf: error: {report.error}", file=sys.stderr)
    elif verbose:
        seconds = f" in {report.result.seconds:.3f} s" if report.result else ""
        bar.write(f"convcrf: {report.status}: {report.item.key}{seconds}", file=sys.stderr)
        for note in report.result.notes if report.result else ():
            bar.write(f"convcrf: note: {note}", file=sys.stderr)
    if report.result is not None:
        for warning in report.result.warnings:
            bar.write(f"convcrf: warning: {warning}", file=sys.stderr)


def _echo_record(record: dict) -> None:
    """Write a report line to stdout; raise :class:`StdoutFailed` if it cannot be written
    (stdout then points at /dev/null, so that the final flush stays quiet)."""
    try:
        echo_out(batch_report.record_line(record), "the report")
    except RuntimeFailure as exc:
        raise StdoutFailed(str(exc)) from exc


def _write_report(path: Path, records: list[dict]) -> None:
    """Write the report file; exit with status 1 and one line if it cannot be written."""
    try:
        batch_report.write_report(path, records)
    except OSError as exc:
        fail(f"{path}: cannot write the report: {exc.strerror or exc}", 1)


def _summary(outcome: _Outcome, device: str, missing: int) -> None:
    """The summary line: counts (``missing``: listed images that do not exist, failed before
    the run), throughput and where the time went."""
    reports, wall, stats = outcome.reports, outcome.wall, outcome.stats
    counts = {
        status: sum(r.status == status for r in reports) for status in (DONE, SKIPPED, FAILED)
    }
    counts[FAILED] += missing
    rate = counts[DONE] / wall if wall > 0 else 0.0
    if outcome.total == 0 and not missing:
        echo_err("convcrf: 0 done, 0 skipped, 0 failed: no items")
        return
    not_run = outcome.total - len(reports)
    share = 100.0 * stats.crf_seconds / wall if wall > 0 else 0.0
    io_share = 100.0 * stats.io_wait_seconds / wall if wall > 0 else 0.0
    echo_err(
        f"convcrf: {counts[DONE]} done, {counts[SKIPPED]} skipped, {counts[FAILED]} failed"
        + (f", {not_run} not run" if not_run else "")
        + f" in {wall:.1f} s ({rate:.2f} images/s; CRF {share:.0f}% of the time on {device}, "
        f"waiting for I/O {io_share:.0f}%)"
    )
