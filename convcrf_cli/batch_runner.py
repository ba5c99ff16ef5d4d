"""Running a batch: I/O workers read and write items while the calling thread runs the CRF.

A pool of ``jobs`` threads decodes images and unaries ahead of the compute stage and encodes
the outputs behind it (Pillow, NumPy and zlib release the GIL), so the CRF, not the disk,
bounds the run. Consecutive items of one size, channel and class count are refined in one
batched call of up to ``batch_size`` images. Every output goes through a temporary name and a
rename; an item that fails is reported and the batch goes on (or stops, with ``fail_fast``).

:func:`run_batch` is a generator of :class:`ItemReport`; close it (``contextlib.closing``)
to stop early: queued work is cancelled and work in flight finishes, so nothing is left
half-written. A run that stops early removes the output directories it created that stayed
empty (those of items read ahead but never written).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from convcrf_cli.backends import Backend
from convcrf_cli.batch_items import BatchItem
from convcrf_cli.errors import OUT_OF_MEMORY_ADVICE, ConvCRFError
from convcrf_cli.outputs import OutputSpec, missing_directories, remove_empty_directories
from convcrf_cli.params import CRFParams
from convcrf_cli.pipeline import (
    ItemResult,
    PreparedItem,
    UnaryOptions,
    describe_backend,
    prepare_item,
    refine_prepared,
    write_item,
)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
"""The statuses of an :class:`ItemReport`."""
ITEM_ERRORS = (ConvCRFError, MemoryError, OSError, RuntimeError, ValueError)
"""What one item may raise without stopping the batch (anything else is a bug and does)."""
DEFAULT_JOBS = max(2, min(8, os.cpu_count() or 1))
"""I/O workers by default: the core count, at least 2 and at most 8."""


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """How to run a batch.

    jobs: I/O worker threads. batch_size: most images per CRF call (same-sized ones only).
    skip_existing: leave items whose outputs all exist. fail_fast: stop at the first failure.
    """

    jobs: int = DEFAULT_JOBS
    batch_size: int = 1
    skip_existing: bool = False
    fail_fast: bool = False

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.batch_size < 1:
            raise ValueError("jobs and batch_size must be at least 1")


@dataclasses.dataclass(frozen=True)
class ItemReport:
    """What happened to one item: ``status`` is ``done``, ``skipped`` or ``failed``.

    error: the failure's one-line message. Its line in the report: see
    :func:`convcrf_cli.batch_report.item_record`.
    """

    item: BatchItem
    status: str
    result: ItemResult | None = None
    error: str | None = None


@dataclasses.dataclass
class BatchStats:
    """What a run measured and left behind, for the summary, the report and the benchmark.

    crf_seconds: the compute stage running the CRF; io_wait_seconds: the compute stage
    waiting for the I/O workers (the share of the run that I/O bounds).
    """

    crf_seconds: float = 0.0
    io_wait_seconds: float = 0.0
    finished_while_stopping: list[ItemReport] = dataclasses.field(default_factory=list)
    """Items whose outputs were being written when the run stopped early (interrupted, or
    closed by its caller) and were then completed: done, though never yielded."""


def run_batch(
    items: list[BatchItem],
    spec_for: Callable[[BatchItem], OutputSpec],
    params: CRFParams,
    backend: Backend,
    unary_options: UnaryOptions,
    settings: BatchSettings,
    stats: BatchStats | None = None,
) -> Iterator[ItemReport]:
    """Refine ``items`` and yield one report per item as it finishes.

    spec_for: the outputs of an item. stats: filled in as the run goes, if given.
    After the first failure with ``settings.fail_fast`` no new item is started and the
    remaining ones are not reported.
    """
    run = _Run(spec_for, params, backend, unary_options, settings, stats or BatchStats())
    missing = missing_directories(path for item in items for path in item.outputs())
    reported = 0
    pool = ThreadPoolExecutor(settings.jobs, thread_name_prefix="convcrf-io")
    try:
        with contextlib.closing(run.reports(collections.deque(items), pool)) as reports:
            for report in reports:
                reported += 1
                yield report
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if reported < len(items):
            run.stats.finished_while_stopping.extend(run.completed_writes())
            remove_empty_directories(missing)


class _Run:
    """The state of one batch: items read ahead, items being written."""

    def __init__(
        self,
        spec_for: Callable[[BatchItem], OutputSpec],
        params: CRFParams,
        backend: Backend,
        unary_options: UnaryOptions,
        settings: BatchSettings,
        stats: BatchStats,
    ) -> None:
        self.spec_for = spec_for
        self.params = params
        self.backend = backend
        self.device = describe_backend(backend)
        self.unary_options = unary_options
        self.settings = settings
        self.stats = stats
        self.loads: collections.deque[tuple[BatchItem, Future]] = collections.deque()
        self.writes: collections.deque[tuple[BatchItem, Future]] = collections.deque()
        self.failed = False

    @property
    def stopping(self) -> bool:
        return self.failed and self.settings.fail_fast

    def reports(self, waiting: collections.deque[BatchItem], pool: ThreadPoolExecutor):
        lookahead = self.settings.jobs + self.settings.batch_size
        while not self.stopping and (waiting or self.loads):
            while waiting and len(self.loads) < lookahead:
                item = waiting.popleft()
                if self.settings.skip_existing and all(p.is_file() for p in item.outputs()):
                    yield ItemReport(item, SKIPPED)
                else:
                    self.loads.append((item, pool.submit(self._load, item)))
            yield from self._finished_writes(limit=2 * self.settings.jobs)
            group = yield from self._next_group()
            if group and not self.stopping:
                yield from self._refine(group, pool)
        for _, future in self.loads:
            future.cancel()
        yield from self._finished_writes(limit=0)

    def completed_writes(self) -> list[ItemReport]:
        """Reports of the queued writes that completed (after the pool has shut down: the
        others were cancelled or failed, and left no output)."""
        completed = [
            ItemReport(item, DONE, future.result())
            for item, future in self.writes
            if future.done() and not future.cancelled() and future.exception() is None
        ]
        self.writes.clear()
        return completed

    def _load(self, item: BatchItem) -> PreparedItem:
        return prepare_item(
            item.image,
            item.unary,
            self.spec_for(item),
            self.params,
            self.unary_options,
        )

    def _wait(self, item: BatchItem, future: Future):
        """The future's result, or an :class:`ItemReport` of the failure; time spent
        waiting counts as I/O wait."""
        start = time.perf_counter()
        try:
            return future.result()
        except ITEM_ERRORS as exc:
            self.failed = True
            return _failure(item, exc)
        finally:
            self.stats.io_wait_seconds += time.perf_counter() - start

    def _finished_writes(self, limit: int):
        """Report finished writes, waiting for the oldest while more than ``limit`` are
        in flight (``limit`` bounds the refined results held in memory)."""
        while self.writes and (self.writes[0][1].done() or len(self.writes) > limit):
            item, future = self.writes[0]
            outcome = self._wait(item, future)  # a signal here leaves it for completed_writes
            self.writes.popleft()
            yield outcome if isinstance(outcome, ItemReport) else ItemReport(item, DONE, outcome)

    def _next_group(self):
        """The next run of up to ``batch_size`` loaded items of one group key, in order;
        failed loads are reported on the way."""
        group: list[tuple[BatchItem, PreparedItem]] = []
        while self.loads and len(group) < self.settings.batch_size and not self.stopping:
            item, future = self.loads[0]
            outcome = self._wait(item, future)
            if isinstance(outcome, ItemReport):
                self.loads.popleft()
                yield outcome
                continue
            if group and outcome.group_key != group[0][1].group_key:
                break
            self.loads.popleft()
            group.append((item, outcome))
        return group

    def _refine(self, group: list[tuple[BatchItem, PreparedItem]], pool: ThreadPoolExecutor):
        """Run the CRF on ``group`` and queue the writes. A failing batched call is retried
        item by item so that one bad item does not fail its neighbours."""
        start = time.perf_counter()
        try:
            refined = refine_prepared([p for _, p in group], self.params, self.backend)
        except ITEM_ERRORS as exc:
            self.stats.crf_seconds += time.perf_counter() - start
            if len(group) > 1:
                for single in group:
                    yield from self._refine([single], pool)
            else:
                self.failed = True
                yield _failure(group[0][0], exc)
            return
        elapsed = time.perf_counter() - start
        self.stats.crf_seconds += elapsed
        for (item, prepared), item_refined in zip(group, refined, strict=True):
            future = pool.submit(
                write_item, prepared, item_refined, elapsed / len(group), self.device
            )
            self.writes.append((item, future))


def _failure(item: BatchItem, exc: BaseException) -> ItemReport:
    """The report of an item that raised ``exc``: one line naming the file."""
    if isinstance(exc, ConvCRFError):
        return ItemReport(item, FAILED, error=str(exc))
    if isinstance(exc, MemoryError):
        return ItemReport(
            item, FAILED, error=f"{item.image}: out of memory ({OUT_OF_MEMORY_ADVICE})"
        )
    if isinstance(exc, OSError):
        message = f"{exc.filename or item.image}: {exc.strerror or exc}"
        return ItemReport(item, FAILED, error=message)
    return ItemReport(item, FAILED, error=f"{item.image}: {exc}")
